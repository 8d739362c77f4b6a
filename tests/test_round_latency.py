"""round-latency-s: a fixed cost per round on the virtual clock and in the performance model; time to accuracy."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from estimators.performance import KneeModel, choose_batch, round_seconds
from flb.analysis import TargetHit, time_to_accuracy
from flb.inprocess import run_inprocess
from strategies.batch_policy import BatchPolicy, ClientCapacity, PolicyMemory
from workloads.config import ConfigError, RunConfig

LATENCY_S = 7.5
LINEAR = KneeModel(alpha=0.0, floor=1e-9, beta=0.001, p=1.0)  # t(b) = 1e-9 + 0.001 b s: 1 ms per example


def test_round_latency_key_defaults_to_zero_and_rejects_negative():
    assert RunConfig().round_latency_s == 0.0
    assert RunConfig.from_mapping({"round-latency-s": 9.6}).round_latency_s == 9.6
    with pytest.raises(ConfigError, match="round-latency-s"):
        RunConfig.from_mapping({"round-latency-s": -1.0})


def test_round_seconds_adds_the_latency_once_per_round():
    # Prepare: slowest client is the second, 0.8 s compute + 0.3 s link; server 0.05 s
    compute, comm = [0.5, 0.8], [0.2, 0.3]
    # Assert: max(0.5 + 0.2, 0.8 + 0.3) + 0.05 + 9.6 = 1.1 + 0.05 + 9.6 = 10.75
    assert round_seconds(compute, comm, server_s=0.05, round_latency_s=9.6) == pytest.approx(10.75)
    assert round_seconds(compute, comm, server_s=0.05) == pytest.approx(1.15)


def test_a_large_round_latency_makes_the_optimal_batch_larger():
    # Prepare: two identical clients, 1 ms per example (t(b) = 0.001 b), a 0.1 s link each,
    # noise scale 1000. Score = (1 + 1000/B) * (0.0005 B + 0.1 + L): the optimum is near sqrt(1000 (0.1 + L) / 0.0005).
    models = [LINEAR] * 2
    grid = [64, 128, 256, 512, 1024, 2048, 4096, 8192]
    # Execute
    none = choose_batch(models, [0.1, 0.1], [8192, 8192], 1000.0, candidates=grid)
    slow = choose_batch(models, [0.1, 0.1], [8192, 8192], 1000.0, candidates=grid, round_latency_s=9.6)
    # Assert: L = 0: B = 512, round 0.256 + 0.1 = 0.356 s, score (1 + 1000/512) * 0.356 = 1.0513
    assert (none.global_batch, none.split) == (512, [256, 256])
    assert none.round_s == pytest.approx(0.356) and none.rel_time == pytest.approx(1.0513125)
    # L = 9.6 s: B = 4096, round 2.048 + 0.1 + 9.6 = 11.748 s, score (1 + 1000/4096) * 11.748 = 14.616
    assert (slow.global_batch, slow.split) == (4096, [2048, 2048])
    assert slow.round_s == pytest.approx(11.748) and slow.rel_time == pytest.approx(14.6161640625)
    # B = 512 would take (1 + 1000/512) * 9.956 = 29.40 (twice as long) with the latency
    assert dict((row[0], row[2]) for row in slow.table)[512] == pytest.approx(29.4013125)
    # cost counts device compute only: the latency leaves it unchanged
    assert [row[3] for row in slow.table] == pytest.approx([row[3] for row in none.table])


def test_the_optimal_policy_passes_the_latency_to_choose_batch():
    # Prepare: the same two clients, probed; calibration measured B_noise = 1000 and no server time
    caps = tuple(ClientCapacity(n, n, 8192, LINEAR, 0.1, 0.0) for n in (0, 1))
    memory = PolicyMemory(capacities=caps, calibration=((1000.0, 0.0), (1000.0, 0.0)))
    chosen = {}
    for latency in (0.0, 9.6):
        cfg = RunConfig.from_mapping({"batch-policy": "optimal", "round-latency-s": latency})
        # Execute
        plan = BatchPolicy(cfg, (), 0.0)._plan_optimal(memory).batch_plan
        # Assert: every candidate's round is 0.001 * ceil(B / 2) + 0.1 + latency (the slower client has the
        # larger half); the best score is chosen; batch_plan.json records the latency
        for c in plan["candidates"]:
            assert c["round_s"] == pytest.approx(0.001 * math.ceil(c["B"] / 2) + 0.1 + latency)
        assert plan["global_batch"] == min(plan["candidates"], key=lambda c: c["rel_time"])["B"]
        assert plan["round_latency_s"] == latency
        chosen[latency] = plan["global_batch"]
    # the default grid (50 sizes from 2 to 16384): optimum sqrt(1000 (0.1 + L) / 0.0005) = 447 or 4405
    assert (chosen[0.0], chosen[9.6]) == (414, 4522)


@pytest.mark.usefixtures("one_thread")
def test_virtual_clock_adds_the_latency_to_every_round(tmp_path):
    cfg = {"dataset": "digits", "num-server-rounds": 3, "eval-every": 100, "seed": 1, "global-batch-size": 64,
           "round-latency-s": LATENCY_S, "out-dir": str(tmp_path / "run")}
    out = run_inprocess(cfg, num_clients=2)
    rounds = pd.read_csv(out / "rounds.csv").query("round > 0").set_index("round")
    clients = pd.read_csv(out / "clients.csv").groupby("round")["virtual_s"].max()
    # virtual_s = max client virtual s + server_s + latency; the CSVs keep 6 significant digits
    extra = rounds["virtual_s"] - clients - rounds["server_s"]
    assert list(rounds.index) == [1, 2, 3]
    assert extra.tolist() == pytest.approx([LATENCY_S] * 3, abs=1e-4)
    assert rounds["virtual_total_s"].tolist() == pytest.approx(rounds["virtual_s"].cumsum().tolist(), rel=1e-5)
    assert rounds.loc[3, "virtual_total_s"] >= 3 * LATENCY_S


def _rounds() -> pd.DataFrame:
    """A hand-made rounds.csv: evaluated at rounds 0, 2, 4; 100 examples a round, 10 s a round."""
    nan = math.nan
    return pd.DataFrame({"round": [0, 1, 2, 3, 4], "test_accuracy": [0.1, nan, 0.55, nan, 0.8],
                         "val_accuracy": [0.1, nan, 0.6, nan, 0.7],
                         "virtual_total_s": [0.0, 10.0, 20.0, 30.0, 40.0], "samples_seen": [0, 100, 200, 300, 400]})


def test_time_to_accuracy_is_the_first_evaluated_round_at_the_target():
    rounds = _rounds()
    # 0.5 is first reached at round 2 (round 1 was not evaluated): 20 s, 200 / 400 = 0.5 epochs
    assert time_to_accuracy(rounds, 0.5, train_examples=400) == TargetHit(2, 20.0, 0.5)
    # exactly at the target counts; the row order does not matter
    assert time_to_accuracy(rounds.iloc[::-1], 0.8, train_examples=400) == TargetHit(4, 40.0, 1.0)
    assert time_to_accuracy(rounds, 0.65, train_examples=400, metric="val_accuracy") == TargetHit(4, 40.0, 1.0)


def test_time_to_accuracy_never_reached_is_none_and_nan():
    hit = time_to_accuracy(_rounds(), 0.9, train_examples=400)
    assert hit.round is None and math.isnan(hit.virtual_total_s) and math.isnan(hit.epochs)
    with pytest.raises(ValueError, match="train_examples"):
        time_to_accuracy(_rounds(), 0.5, train_examples=0)
