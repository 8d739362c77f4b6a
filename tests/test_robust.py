"""Robust aggregators (strategies/robust.py): their numbers, and how the server step uses them."""

from __future__ import annotations

import pytest
import torch

from strategies.robust import (
    Aggregator,
    bucket_means,
    centered_clip,
    krum,
    trimmed_mean,
    weighted_median,
)
from strategies.server_state import ServerState
from strategies.server_step import plan_round, server_step
from tests.test_server_step import MODEL, NAMES, _replies, _setup
from workloads.config import RunConfig
from workloads.errors import ConfigError


def test_weighted_median_and_trimmed_mean_by_hand():
    x = torch.tensor([[1.0, 10.0], [2.0, -5.0], [3.0, 0.0], [100.0, 1.0]])
    assert weighted_median(x, torch.tensor([1.0, 1.0, 1.0, 1.0])).tolist() == [2.0, 0.0]
    # weight 5 on the second client: it holds more than half of the weight, so it is the median
    assert weighted_median(x, torch.tensor([1.0, 5.0, 1.0, 1.0])).tolist() == [2.0, -5.0]
    # trim 25% of the weight (1 of 4) at each end: the mean of the middle two
    torch.testing.assert_close(trimmed_mean(x, torch.ones(4), 0.25), torch.tensor([2.5, 0.5]))
    # weights 2,1,1,4 (total 8), trim 1 at each end: column 0 sorted 1(2),2(1),3(1),100(4) keeps 1(1),2,3,100(3)
    w = torch.tensor([2.0, 1.0, 1.0, 4.0])
    assert trimmed_mean(x, w, 0.125)[0].item() == pytest.approx((1 + 2 + 3 + 300) / 6)
    torch.testing.assert_close(trimmed_mean(x, w, 0.0), (w[:, None] * x).sum(0) / w.sum())


def test_krum_picks_the_client_in_the_honest_cluster():
    gen = torch.Generator().manual_seed(0)
    honest = 0.1 * torch.randn(7, 50, generator=gen) + 1.0
    attackers = torch.full((2, 50), -5.0) + 0.001 * torch.randn(2, 50, generator=gen)  # a tight pair, far away
    x = torch.cat([attackers, honest])
    assert krum(x, f=2) >= 2


def test_centered_clip_bounds_each_clients_pull():
    """With one iteration, each client moves the center by at most w_i / W * tau."""
    center = torch.zeros(3)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1000.0, 0.0, 0.0]])
    v = centered_clip(x, torch.ones(3), center, radius=2.0, iterations=1)
    torch.testing.assert_close(v, torch.tensor([1.0 / 3 + 2.0 / 3, 1.0 / 3, 0.0]))
    # radius 0 = auto: the weighted median distance (1.0 here), so the far client pulls by 1/3 only
    auto = centered_clip(x, torch.ones(3), center, radius=0.0, iterations=1)
    torch.testing.assert_close(auto, torch.tensor([2.0 / 3, 1.0 / 3, 0.0]))
    # cc-radius-scale 2: tau = 2 x the median distance, the near clients unclipped, the far one pulls by 2/3
    wide = centered_clip(x, torch.ones(3), center, radius=0.0, iterations=1, radius_scale=2.0)
    torch.testing.assert_close(wide, torch.tensor([1.0 / 3 + 2.0 / 3, 1.0 / 3, 0.0]))
    # a huge radius is the plain weighted mean
    torch.testing.assert_close(centered_clip(x, torch.tensor([1.0, 2.0, 3.0]), center, 1e12, 1),
                               torch.tensor([3001.0 / 6, 2.0 / 6, 0.0]))


def test_centered_clip_drops_the_clients_beyond_the_drop_ratio():
    """cc-drop-ratio: a client 100 median distances away pulls by tau when clipped, not at all when dropped."""
    center, w = torch.zeros(2), torch.ones(4)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -100.0]])  # median distance 1, tau 1.5
    clipped = centered_clip(x, w, center, radius=0.0, iterations=1, radius_scale=1.5)
    torch.testing.assert_close(clipped, torch.tensor([0.0, (1.0 - 1.5) / 4]))
    # dropped: the mean of the three honest rows, a fixed point (each within tau of it), so 3 iterations keep it
    dropped = centered_clip(x, w, center, radius=0.0, iterations=3, radius_scale=1.5, drop_ratio=10.0)
    torch.testing.assert_close(dropped, torch.tensor([0.0, 1.0 / 3]))
    # a ratio above the far client's 100 medians keeps it: the clipped result again
    kept = centered_clip(x, w, center, radius=0.0, iterations=1, radius_scale=1.5, drop_ratio=101.0)
    torch.testing.assert_close(kept, clipped)
    for bad in (0.5, 1.0, -2.0):
        with pytest.raises(ConfigError, match=rf"'cc-drop-ratio' = {bad}: must be 0 \(off\) or > 1"):
            RunConfig.from_mapping({"aggregator": "centered-clip", "cc-drop-ratio": bad})
    assert Aggregator.from_config(RunConfig.from_mapping({"cc-drop-ratio": 4.0})).drop_ratio == 4.0


def _run(setup, rounds: int = 4) -> ServerState:
    state = ServerState.initial(MODEL, seed=1, teacher={})
    for _ in range(rounds):
        state, plan = plan_round(state, setup, {7: 0, 8: 1, 9: 2}, k=3)
        state, _ = server_step(state, _replies(plan), plan)
    return state


def test_centered_clip_with_an_unbounded_radius_is_the_mean_with_server_momentum():
    """Clients' momenta m_i = beta m_i + g_i + wd w average to the server's heavy-ball velocity."""
    config = {"momentum": 0.9, "weight-decay": 0.01, "global-batch-size": 9}
    mean = _run(_setup(**config))
    clipped = _run(_setup(**config, **{"aggregator": "centered-clip", "cc-radius": 1e12, "cc-iterations": 1}))
    for n in NAMES:
        torch.testing.assert_close(clipped.model[n], mean.model[n], rtol=1e-5, atol=1e-6)
    assert sorted(clipped.client_momentum) == [0, 1, 2] and mean.client_momentum == {}
    # the auto radius at scale 1 (the median distance) clips the farthest honest client: not the mean step any more
    auto = _run(_setup(**config, **{"aggregator": "centered-clip", "cc-radius-scale": 1.0}))
    assert not torch.allclose(auto.model["w"], mean.model["w"], atol=1e-4)


def test_bucket_means_keep_the_weighted_mean_and_dilute_an_attacker():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(7, 5, generator=gen, dtype=torch.float64), torch.tensor([1.0, 2, 3, 1, 1, 4, 2])
    xb, wb = bucket_means(x, w, 3, torch.Generator().manual_seed(0))
    assert xb.shape == (3, 5) and float(wb.sum()) == 14.0
    # buckets of 3, 3 and 1 clients; the bucket-weighted mean of the bucket means is the exact mean
    torch.testing.assert_close((wb @ xb) / wb.sum(), (w.double() @ x) / w.sum())
    # the same seed gives the same buckets; size 1 is a permutation of the rows
    torch.testing.assert_close(bucket_means(x, w, 3, torch.Generator().manual_seed(0))[0], xb)
    one, w1 = bucket_means(x, w, 1, torch.Generator().manual_seed(0))
    assert sorted(one[:, 0].tolist()) == sorted(x[:, 0].tolist()) and sorted(w1.tolist()) == sorted(w.tolist())
    # one attacker at 1,000 among 5 clients at 1 (equal weights), buckets of 2: its bucket mean is 500.5
    bad = torch.tensor([[1.0], [1.0], [1.0], [1000.0], [1.0], [1.0]])
    b, _ = bucket_means(bad, torch.ones(6), 2, torch.Generator().manual_seed(1))
    assert sorted(b[:, 0].tolist()) == [1.0, 1.0, 500.5]
    with pytest.raises(ValueError, match="bucket size must be at least 1, got 0"):
        bucket_means(x, w, 0, gen)


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "centered-clip"])
def test_one_bucket_of_every_client_is_the_exact_mean_step(name):
    """bucket-size >= K: one bucket, the b_i-weighted mean, so every rule takes the mean's step."""
    config = {"momentum": 0.9, "weight-decay": 0.0, "global-batch-size": 9}
    mean = _run(_setup(**config))
    bucketed = _run(_setup(**config, aggregator=name, **{"bucket-size": 3}))
    for n in NAMES:
        torch.testing.assert_close(bucketed.model[n], mean.model[n], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="'bucket-size' = 0"):
        RunConfig.from_mapping({"bucket-size": 0})


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum"])
def test_other_aggregators_step_with_their_aggregate(name):
    setup = _setup(aggregator=name, momentum=0.0, **{"weight-decay": 0.0, "global-batch-size": 9})
    state, plan = plan_round(ServerState.initial(MODEL, seed=1, teacher={}), setup, {7: 0, 8: 1, 9: 2}, k=3)
    replies = _replies(plan)
    new, _ = server_step(state, replies, plan)
    expected = Aggregator.from_config(setup.cfg)([[r.grads[n] for n in NAMES] for r in replies], [3, 3, 3])
    for n, e in zip(NAMES, expected):
        torch.testing.assert_close(new.model[n], MODEL[n] - 0.1 * e)


def test_a_robust_aggregator_refuses_a_teacher_that_reads_client_gradients():
    from strategies.teacher_registry import check_teacher

    check_teacher(RunConfig.from_mapping({"aggregator": "median", "teacher": "step"}))
    with pytest.raises(ConfigError, match=r"'teacher' = 'adascale' with aggregator = 'krum'.*Allowed with a robust"):
        check_teacher(RunConfig.from_mapping({"aggregator": "krum", "teacher": "adascale"}))
    with pytest.raises(ConfigError, match=r"'byzantine-fraction' = 0.5: must be in \[0, 0.5\)"):
        RunConfig.from_mapping({"byzantine-fraction": 0.5})
    with pytest.raises(ConfigError, match="'aggregator'"):
        RunConfig.from_mapping({"aggregator": "geomed"})
