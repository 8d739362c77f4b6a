"""ClientApp and strategy called directly on hand-built Messages (no Ray)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from client_app.app import app as client_app
from strategies.large_batch import LargeBatchStrategy, RoundFailure
from strategies.teacher_registry import build_teacher
from flb.inprocess import FakeGrid, client_context, delivered, reply_via_client, state_arrays
from workloads.config import ConfigError, RunConfig
from workloads.devices import DeviceProfile
from workloads.models import build_model
from workloads.training import draw_batch


def _strategy(run_config):
    cfg = RunConfig.from_mapping(run_config)
    model = build_model("mlp", (1, 8, 8), 10, cfg.seed)
    return cfg, LargeBatchStrategy(cfg, model.state_dict(), [n for n, _ in model.named_parameters()], build_teacher(cfg))


def test_configure_train_sends_each_client_its_own_config():
    cfg, strategy = _strategy({"global-batch-size": 50, "clients-per-round": 3, "micro-batch-size": 4})
    msgs = list(strategy.configure_train(1, state_arrays(strategy.state), ConfigRecord(), FakeGrid([5, 6, 7, 8])))
    assert len(msgs) == 3 and len({m.metadata.dst_node_id for m in msgs}) == 3
    sizes = sorted(int(m.content["config"]["local-batch-size"]) for m in msgs)
    assert sizes == [16, 17, 17]
    assert all(int(m.content["config"]["micro-batch-size"]) == 4 for m in msgs)
    assert all(m.content["config"]["lr"] == pytest.approx(cfg.lr / cfg.warmup_rounds) for m in msgs)


def test_client_reply_has_gradient_and_metrics():
    run_config = {"global-batch-size": 30}
    cfg, strategy = _strategy(run_config)
    (msg,) = list(strategy.configure_train(1, state_arrays(strategy.state), ConfigRecord(), FakeGrid([9])))
    reply = reply_via_client(client_app, msg, client_context(9, 0, 1, run_config))
    assert not reply.has_error(), reply.error
    grads = reply.content["grads"]
    assert list(grads.keys()) == [n for n in strategy.param_names]
    for name, arr in grads.items():
        assert arr.numpy().shape == tuple(strategy.state[name].shape)
        assert float(abs(arr.numpy()).sum()) > 0  # a real gradient
    m = reply.content["metrics"]
    assert m["num-examples"] == 30 and 1.5 < m["train-loss"] < 3.5  # ~ln(10) at init
    assert m["compute-s"] > 0 and m["peak-mem-mb"] > 0 and m["partition-size"] == 1294


def test_client_error_fails_the_round_with_its_reason():
    run_config = {"global-batch-size": 2000, "clients-per-round": 1, "round-retries": 0, "max-failed-rounds": 0}
    cfg, strategy = _strategy(run_config)
    (msg,) = list(strategy.configure_train(1, state_arrays(strategy.state), ConfigRecord(), FakeGrid([9])))
    with pytest.raises(ConfigError) as err:
        reply_via_client(client_app, msg, client_context(9, 0, 4, run_config))
    assert "exceeds its partition (324 examples" in str(err.value)
    # Simulation and SuperNodes turn a ClientApp exception into an error reply like this one.
    reply = Message(Error(code=2, reason=f"{type(err.value)}:<'{err.value}'>"), reply_to=delivered(msg))
    with pytest.raises(RoundFailure, match="1 of 1 clients failed.*exceeds its partition"):
        strategy.aggregate_train(1, [reply])


def test_strategy_fails_on_any_error_reply():
    cfg, strategy = _strategy({"global-batch-size": 8, "round-retries": 0, "max-failed-rounds": 0})
    (msg,) = list(strategy.configure_train(1, state_arrays(strategy.state), ConfigRecord(), FakeGrid([3])))
    err = Message(Error(code=2, reason="boom"), reply_to=delivered(msg))
    with pytest.raises(RoundFailure, match="boom"):
        strategy.aggregate_train(1, [err])


def test_sampler_visits_every_example_once_per_epoch():
    n, b = 37, 8
    seen, epoch, cursor = [], 0, 0
    for _ in range(n * 3 // b + 1):
        pos, epoch, cursor = draw_batch(n, b, seed=4, epoch=epoch, cursor=cursor)
        seen += pos.tolist()
    for e in range(3):
        assert sorted(seen[e * n : (e + 1) * n]) == list(range(n))
    # different epochs are shuffled differently
    assert seen[:n] != seen[n : 2 * n]


def test_sampler_position_comes_from_the_server_not_the_client():
    """A SuperNode starts a fresh ClientApp process per message: the draw must not need client state."""
    run_config = {"global-batch-size": 100}
    cfg, strategy = _strategy(run_config)
    grads = []
    for rnd in (1, 2, 3):
        (msg,) = list(strategy.configure_train(rnd, state_arrays(strategy.state), ConfigRecord(), FakeGrid([9])))
        assert msg.content["config"]["drawn-examples"] == 100 * (rnd - 1)
        replies = [reply_via_client(client_app, msg, client_context(9, 0, 1, run_config)) for _ in range(2)]
        a, b = (torch.cat([torch.from_numpy(x.numpy()).reshape(-1) for x in r.content["grads"].values()]) for r in replies)
        assert torch.equal(a, b)  # two fresh contexts, the same examples
        grads.append(a)
        strategy.aggregate_train(rnd, replies[:1])
    assert strategy.server_state.drawn == {0: 300}
    assert not torch.equal(grads[0], grads[1])


def test_micro_batching_does_not_change_the_gradient():
    grads = []
    for micro in (0, 7):
        run_config = {"global-batch-size": 64, "micro-batch-size": micro}
        cfg, strategy = _strategy(run_config)
        (msg,) = list(strategy.configure_train(1, state_arrays(strategy.state), ConfigRecord(), FakeGrid([9])))
        reply = reply_via_client(client_app, msg, client_context(9, 0, 1, run_config))
        grads.append(torch.cat([torch.from_numpy(a.numpy()).reshape(-1) for a in reply.content["grads"].values()]))
        assert reply.content["metrics"]["micro-batch-size"] == (7 if micro else 64)
    assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 1e-6


def test_client_parses_the_run_config_once_per_run_and_config(monkeypatch):
    import client_app.run_config as rc

    parsed, profiled = [], []
    real_parse, real_profiles = RunConfig.from_mapping.__func__, rc.parse_profiles
    monkeypatch.setattr(rc.RunConfig, "from_mapping", classmethod(lambda cls, m: parsed.append(dict(m)) or real_parse(cls, m)))
    monkeypatch.setattr(rc, "parse_profiles", lambda text: profiled.append(text) or real_profiles(text))
    monkeypatch.setattr(rc, "_CACHE", type(rc._CACHE)())
    config = {"global-batch-size": 30, "device-profiles": "a:100,b:0"}

    def context(run_id, run_config):
        return Context(run_id=run_id, node_id=9, node_config={}, state=RecordDict(), run_config=dict(run_config))

    first = rc.client_run(context(1, config))
    for _ in range(3):  # further messages of the run, in fresh contexts, in any key order
        assert rc.client_run(context(1, dict(reversed(config.items())))) is first
        assert first.profiles == (DeviceProfile("a", 100.0), DeviceProfile("b", 0.0))
    assert len(parsed) == 1 and profiled == ["a:100,b:0"]
    assert rc.client_run(context(2, config)) is not first  # another run served by the same process
    changed = rc.client_run(context(1, config | {"global-batch-size": 31}))  # the same run id, another config
    assert changed.cfg.global_batch_size == 31 and len(parsed) == 3
    rc.client_run(context(1, {"augment": True}))
    with pytest.raises(ConfigError, match="'augment' = 1 has the wrong type"):  # 1 == True, but not the same config
        rc.client_run(context(1, {"augment": 1}))
    bad = rc.client_run(context(3, {"device-profiles": "phone"}))  # profiles are parsed (and fail) only when used
    for _ in range(2):
        with pytest.raises(ConfigError, match="'device-profiles' entry 'phone'"):
            bad.profiles
