"""Excluding persistent clients (strategies/persistence.py, run-config ``exclude-ratio``): numbers and the server path."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from experiments import attacks
from strategies.persistence import SKETCH_DIM, Persistence, persistence_ratios, sketch, update
from strategies.server_state import ServerState
from strategies.server_step import plan_round, server_step
from tests.test_server_step import MODEL, _replies, _setup
from workloads.config import RunConfig
from workloads.errors import ConfigError

N, D = 20, 3000


def _round(gen: torch.Generator, rnd: int, attack: str, f: int) -> torch.Tensor:
    """N client gradients of one round: a signal that turns from round to round under noise 10 times its size."""
    mu = torch.randn(D, generator=torch.Generator().manual_seed(rnd)) / math.sqrt(D)
    honest = mu + 10 * torch.randn(N, D, generator=gen) / math.sqrt(D)
    if attack == "alie":
        honest[:f] = attacks.alie(honest[f:], N, f)
    elif attack == "ipm":
        honest[:f] = attacks.ipm(honest[f:], 0.1)
    elif attack == "sign-flip":
        honest[:f] = -honest[:f]
    return honest


def _excluded(attack: str, f: int, rounds: int, ratio: float = 6.0, after: int = 10) -> tuple[int, ...]:
    gen, state = torch.Generator().manual_seed(7), Persistence()
    for rnd in range(rounds):
        state = update(state, list(range(N)), _round(gen, rnd, attack, f), ratio, after)
    return tuple(sorted(state.excluded))


def test_sketch_keeps_squared_distances_to_a_few_percent():
    x = torch.randn(6, 50_000, generator=torch.Generator().manual_seed(0))
    s = sketch(x)
    assert s.shape == (6, SKETCH_DIM)
    exact, kept = torch.cdist(x.double(), x.double()) ** 2, torch.cdist(s, s) ** 2
    off = ~torch.eye(6, dtype=torch.bool)
    assert float((kept[off] / exact[off] - 1).abs().max()) < 0.15  # sqrt(2 / 1024) = 4.4% is one sd
    torch.testing.assert_close(sketch(x), s)  # the same hash every call


def test_honest_clients_agree_and_none_is_excluded():
    assert _excluded("clean", 0, 150) == ()


@pytest.mark.parametrize(("attack", "f"), [("alie", 4), ("sign-flip", 4), ("ipm", 8)])
def test_persistent_attackers_are_excluded_and_no_honest_client(attack, f):
    assert _excluded(attack, f, 80) == tuple(range(f))


def test_ratios_grow_with_rounds_for_a_steady_difference_only():
    gen, state = torch.Generator().manual_seed(3), Persistence()
    x = torch.randn(N, D, generator=gen)
    for _ in range(40):  # client 0 differs by the same vector every round; the others by fresh noise only
        noise = torch.randn(N, D, generator=gen)
        noise[0] += 0.3 * x[0]
        state = update(state, list(range(N)), noise, 1e9, 1)
    rho = persistence_ratios(state)[0]  # the sketch's
    # a pair's noise is 2 D per round, the steady part 0.09 D: rho = 1 + 40 * 0.09 D / (2 D) = 2.8
    assert 2.4 < float(rho[0, 1:].min()) and float(rho[0, 1:].max()) < 3.2
    assert 0.9 < float(rho[1:, 1:][~torch.eye(N - 1, dtype=torch.bool)].median()) < 1.1  # noise alone: 1


def test_never_half_of_the_clients_and_not_before_exclude_after():
    assert _excluded("alie", 4, 9, after=10) == ()  # too early
    gen, state = torch.Generator().manual_seed(1), Persistence()
    for _ in range(30):  # 10 of 20 send one vector: no majority, at most 9 can go
        x = torch.randn(N, D, generator=gen)
        x[:10] = 5.0 / math.sqrt(D)
        state = update(state, list(range(N)), x, 4.0, 10)
    assert len(state.excluded) <= 9


def test_a_client_seen_later_gets_a_row_and_the_state_survives_a_checkpoint():
    gen = torch.Generator().manual_seed(2)
    state = update(Persistence(), [0, 1, 2], torch.randn(3, D, generator=gen), 4.0, 10)
    state = update(state, [2, 3, 4, 5], torch.randn(4, D, generator=gen), 4.0, 10)
    assert state.clients == (0, 1, 2, 3, 4, 5) and state.rounds.tolist() == [1, 1, 2, 1, 1, 1]
    assert state.pair_rounds[2].tolist() == [1, 1, 2, 1, 1, 1] and state.pair_rounds[0, 3] == 0
    assert torch.isnan(persistence_ratios(state)[0, 0, 3])  # never in one round together
    initial = ServerState.initial(MODEL, 0, {})
    back = ServerState.from_dict(dataclasses.replace(initial, persistence=state).to_dict()).persistence
    assert back.clients == state.clients and torch.equal(back.sums, state.sums)
    assert torch.equal(back.pair_sq, state.pair_sq) and back.rounds.tolist() == state.rounds.tolist()
    older = {k: v for k, v in initial.to_dict().items() if k != "persistence"}  # a checkpoint from before
    assert ServerState.from_dict(older).persistence.clients == ()


def test_exclude_ratio_is_checked_and_needs_a_robust_aggregator():
    with pytest.raises(ConfigError, match=r"'exclude-ratio' = 0.5 with aggregator = 'centered-clip': must be 0"):
        RunConfig.from_mapping({"exclude-ratio": 0.5, "aggregator": "centered-clip"})
    with pytest.raises(ConfigError, match=r"'exclude-ratio' = 4.0 with aggregator = 'mean'.*robust aggregator"):
        RunConfig.from_mapping({"exclude-ratio": 4.0})
    with pytest.raises(ConfigError, match="'exclude-after' = 0"):
        RunConfig.from_mapping({"exclude-after": 0})


def test_an_excluded_client_is_no_longer_sampled_and_the_round_goes_on():
    setup = _setup(aggregator="median", **{"exclude-ratio": 4.0, "global-batch-size": 9})
    state = ServerState.initial(MODEL, seed=1, teacher={})
    state = dataclasses.replace(state, persistence=Persistence(excluded=(1,)))
    state, plan = plan_round(state, setup, {7: 0, 8: 1, 9: 2}, k=3)
    assert sorted(pid for pid, _ in plan.assigned.values()) == [0, 2] and plan.planned == 9
    new, record = server_step(state, _replies(plan), plan)
    assert record.row["clients"] == 2 and record.row["excluded_clients"] == 1 and new.persistence.excluded == (1,)


def test_a_sign_flipping_client_is_excluded_in_a_real_run_and_the_rest_train(tmp_path):
    """The in-process grid with the real ClientApp: partition 0 sends minus its gradient every round."""
    import pandas as pd

    from client_app.app import app as client_app
    from experiments.faults import Fault, FaultyClientApp
    from flb.inprocess import run_inprocess

    faulty = FaultyClientApp(client_app, lambda r, p: Fault("scale", -1.0) if p == 0 else None)
    config = {"num-server-rounds": 30, "eval-every": 30, "global-batch-size": 60, "aggregator": "centered-clip",
              "exclude-ratio": 6.0, "exclude-after": 5, "out-dir": str(tmp_path)}
    run_inprocess(config, num_clients=6, client_app=faulty)
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    rounds = rounds[rounds["round"] > 0]
    first = int(rounds.loc[rounds["excluded_clients"] > 0, "round"].min())
    clients = pd.read_csv(tmp_path / "clients.csv")
    assert 5 <= first < 30 and (rounds["excluded_clients"].max()) == 1
    assert 0 not in set(clients.loc[clients["round"] > first, "partition_id"])  # no longer sampled
    later = rounds[rounds["round"] > first]
    assert (later["global_batch"] == 60).all() and (later["clients"] == 5).all()  # B split over the other 5
    assert float(rounds["test_accuracy"].dropna().iloc[-1]) > 0.85
