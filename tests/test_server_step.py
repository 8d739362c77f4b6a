"""The server's round as pure functions of values (strategies/server_step.py), without Flower."""

from __future__ import annotations

import dataclasses
import io
import math
from collections import OrderedDict

import pytest
import torch

from strategies.gradient_noise import NoiseTeacher
from strategies.server_state import ServerState
from strategies.server_step import (
    ClientReply, DivergenceError, RoundFailure, RunSetup, StepPlan, plan_round, server_step,
)
from strategies.teachers import IdentityTeacher, StepTeacher
from workloads.config import RunConfig

MODEL = OrderedDict(w=torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]), b=torch.tensor([0.1, -0.2, 0.3]))
NAMES = ["w", "b"]


def _setup(teacher=None, **run_config) -> RunSetup:
    cfg = RunConfig.from_mapping({"lr": 0.1, "warmup-rounds": 0, "schedule": "constant"} | run_config)
    return RunSetup.create(cfg, MODEL, NAMES, teacher or IdentityTeacher())


def _reply(node: int, pid: int, b: int, grads: dict[str, torch.Tensor], loss: float = 1.0) -> ClientReply:
    metrics = {"num-examples": b, "train-loss": loss, "compute-s": 0.01, "peak-mem-mb": math.nan,
               "predicted-peak-mb": 1.0, "budget-mb": 0.0, "max-batch": 0, "micro-batch-size": b, "partition-id": pid}
    return ClientReply(node, pid, grads=grads, metrics=metrics)


def _grads(pid: int, rnd: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rnd + pid)
    return {n: torch.randn(MODEL[n].shape, generator=gen) for n in NAMES}


def _replies(plan: StepPlan) -> list[ClientReply]:
    return [_reply(node, pid, b, _grads(pid, plan.round)) for node, (pid, b) in plan.assigned.items()]


def test_two_replies_give_the_weighted_mean_sgd_step():
    setup = _setup(**{"momentum": 0.9, "weight-decay": 0.01})
    state = ServerState.initial(MODEL, seed=0, teacher={})
    state, plan = plan_round(state, setup, {10: 0, 11: 1}, k=2, batches={0: 3, 1: 5})
    assert dict(plan.assigned) == {10: (0, 3), 11: (1, 5)} and plan.round == 1 and plan.lr == pytest.approx(0.1)
    g0, g1 = _grads(0, 1), _grads(1, 1)
    before = {k: v.clone() for k, v in state.model.items()}
    new, record = server_step(state, [_reply(11, 1, 5, g1, loss=2.0), _reply(10, 0, 3, g0, loss=1.0)], plan)
    for n in NAMES:
        mean = (3 * g0[n] + 5 * g1[n]) / 8
        step = mean + 0.01 * MODEL[n]  # the first momentum step: v = d
        torch.testing.assert_close(new.model[n], MODEL[n] - 0.1 * step, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(new.velocity[NAMES.index(n)], step, rtol=1e-6, atol=1e-7)
        assert torch.equal(state.model[n], before[n])  # the given state is left as it was
    assert state.velocity is None and state.round == 0 and new.round == 1
    assert new.drawn == {0: 3, 1: 5} and new.samples_seen == 8 and len(new.norm_history) == 1
    row = record.row
    assert (row["round"], row["clients"], row["global_batch"], row["planned_batch"], row["failed_clients"]) == (1, 2, 8, 8, 0)
    assert row["train_loss"] == pytest.approx((3 * 1.0 + 5 * 2.0) / 8) and row["lr"] == pytest.approx(0.1)
    assert [c["partition_id"] for c in record.clients] == [0, 1]  # ordered by partition, not by arrival


def _run(state: ServerState, setup: RunSetup, rounds: int) -> ServerState:
    for _ in range(rounds):
        state, plan = plan_round(state, setup, {7: 0, 8: 1, 9: 2}, k=2)
        state, _ = server_step(state, _replies(plan), plan)
    return state


def _saved_and_loaded(state: ServerState) -> ServerState:
    buf = io.BytesIO()
    torch.save(state.to_dict(), buf)
    buf.seek(0)
    return ServerState.from_dict(torch.load(buf, weights_only=True))


def test_a_state_round_trips_and_a_resumed_run_equals_the_uninterrupted_one():
    """The state is the whole checkpoint: a fresh teacher object continues from it bit for bit."""
    config = {"momentum": 0.9, "weight-decay": 5e-4, "global-batch-size": 24}
    setup = _setup(NoiseTeacher(4, seed=3), **config)
    start = ServerState.initial(MODEL, seed=5, teacher=setup.teacher.state_dict())
    straight = _run(start, setup, 5)
    halfway = _run(start, setup, 3)
    fresh = _setup(NoiseTeacher(4, seed=99), **config)  # another object; its own seed is overwritten by the state
    resumed = _run(_saved_and_loaded(halfway), fresh, 2)
    assert resumed.round == straight.round == 5
    assert all(torch.equal(resumed.model[k], straight.model[k]) for k in MODEL)
    assert all(torch.equal(a, b) for a, b in zip(resumed.velocity, straight.velocity))
    assert torch.equal(resumed.teacher["generator"], straight.teacher["generator"])
    assert (resumed.rng, resumed.drawn, resumed.samples_seen, resumed.norm_history) == (
        straight.rng, straight.drawn, straight.samples_seen, straight.norm_history)
    assert not torch.equal(straight.model["w"], start.model["w"])


def test_too_few_valid_replies_fail_the_round_and_carry_the_failures():
    setup = _setup(**{"global-batch-size": 24})
    state, plan = plan_round(ServerState.initial(MODEL, 0, {}), setup, {1: 0, 2: 1, 3: 2}, k=3)
    good, dup, _ = _replies(plan)
    stranger = _reply(99, 7, 8, _grads(7, 1))
    with pytest.raises(RoundFailure, match=r"round 1: valid replies cover 8 of the 24") as err:
        server_step(state, [good, dup, dup, stranger, ClientReply(3, 2, error="client error: boom")], plan)
    reasons = {f["node_id"]: f["reason"] for f in err.value.check.failures}
    assert reasons == {2: "sent 2 replies to one message", 3: "client error: boom",
                       99: "replied, but was not sampled this round"}
    assert err.value.check.missing == [] and [r.node_id for r in err.value.check.valid] == [1]
    _, record = server_step(state, [good], _with_min_fraction(plan, 1 / 3))
    assert record.check.missing == [2, 3] and record.row["global_batch"] == 8


def _with_min_fraction(plan: StepPlan, min_fraction: float) -> StepPlan:
    cfg = dataclasses.replace(plan.setup.cfg, min_batch_fraction=min_fraction)
    return dataclasses.replace(plan, setup=dataclasses.replace(plan.setup, cfg=cfg))


def test_a_divergent_step_raises_and_leaves_the_state():
    setup = _setup(StepTeacher("0:1e39", 10))
    state, plan = plan_round(ServerState.initial(MODEL, 0, {}), setup, {1: 0, 2: 1}, k=2)
    with pytest.raises(DivergenceError, match="round 1: the server step would make the global model non-finite"):
        server_step(state, _replies(plan), plan)
    assert all(torch.equal(state.model[k], MODEL[k]) for k in MODEL) and state.velocity is None


def test_a_checkpoint_without_the_round_in_its_state_still_loads(tmp_path):
    from server_app.results import RunResults

    cfg = RunConfig.from_mapping({"out-dir": str(tmp_path)})
    results = RunResults(tmp_path, cfg)
    state = _run(ServerState.initial(MODEL, 0, {}), _setup(), 2)
    path = results.save_checkpoint(state, wall_s=1.5)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["strategy"]["round"]  # as format 1 wrote it before the state held its round
    torch.save(ckpt, path)
    loaded, wall = RunResults(tmp_path, RunConfig.from_mapping({"out-dir": str(tmp_path), "resume": True})).load_checkpoint()
    assert loaded.round == 2 and wall == 1.5 and all(torch.equal(loaded.model[k], state.model[k]) for k in MODEL)
