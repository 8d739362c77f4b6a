"""The time-to-accuracy study's pieces (experiments/time_to_accuracy.py) on digits, one or two epochs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from estimators.performance import comm_seconds
from experiments import time_to_accuracy as tta
from experiments import tta_methods as tm
from experiments import tta_training as tt
from strategies.batch_policy import scheduled_batch
from strategies.server_opt import ServerSGD, velocity_from_weights
from workloads.data import load_splits
from workloads.models import build_model
from workloads.registry import WORKLOADS
from workloads.training import batch_gradient


@pytest.fixture()
def digits(monkeypatch):
    """The study's module shrunk to digits, the MLP, 2 epochs, an evaluation every epoch."""
    torch.set_num_threads(1)
    for module in (tm, tt):  # the constants as each module reads them
        for name, value in (("DATASET", "digits"), ("MODEL", "mlp"), ("EPOCHS", 2), ("EVAL_EPOCHS", 1)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, value)
    return load_splits("digits", "", 0.1)


def test_the_batch_step_schedule_doubles_every_quarter_of_the_epochs():
    steps, rounds = tm.step_schedule(5000)  # a quarter is 50,000 examples
    assert rounds == 782 + 391 + 196 + 98
    assert steps == [(0, 1.0), (782, 2.0), (1173, 4.0), (1369, 8.0)]
    assert tm.planned_rounds(tm.METHODS["small"], 5000) == 6250
    assert tm.planned_rounds(tm.METHODS["large"], 5000) == 391
    assert tm.planned_rounds(tm.METHODS["batch-step"], 5000) == rounds
    assert tm.local_phase(tm.METHODS["post-local"], 5000) == (196, 195)  # 391 steps: half at 512, then local
    assert tm.planned_rounds(tm.METHODS["post-local"], 5000) == 196 + 13
    assert tm.planned_steps(tm.METHODS["local-sgd"], 5000) == 391 and tm.planned_rounds(tm.METHODS["local-sgd"], 5000) == 25
    local = tm.METHODS["batch-step-local"]  # batch-step's 1,467 steps in rounds of 8: 98 + 49 + 25 + 13
    assert tm.planned_steps(local, 5000) == rounds and tm.planned_rounds(local, 5000) == 185
    assert [tm.planned_rounds(tm.METHODS[f"batch-step-local-{h}"], 5000) for h in (4, 2)] == [196 + 98 + 49 + 25, 391 + 196 + 98 + 49]
    plan = tm.local_rounds(local, 5000)
    assert plan[:2] == [(64, 8), (64, 8)] and plan[97] == (64, 6) and plan[98] == (128, 8) and plan[-1] == (512, 2)
    assert sum(h for _, h in plan) == rounds and sum(b * h for b, h in plan) == 782 * 64 + 391 * 128 + 196 * 256 + 98 * 512


def test_batch_step_128_starts_at_128_and_ends_at_1024_in_a_quarter_of_small_batchs_rounds():
    method = tm.METHODS["batch-step-128"]
    steps, rounds = tm.step_schedule(5000, method.steps)
    assert steps == [(0, 1.0), (391, 2.0), (587, 4.0), (685, 8.0)]
    assert rounds == 391 + 196 + 98 + 49 == tm.planned_rounds(method, 5000)
    assert rounds / tm.planned_rounds(tm.METHODS["small"], 5000) < 0.118


def test_the_clients_split_gives_the_union_batch_gradient(digits):
    w = WORKLOADS["digits"]
    model = build_model("mlp", w.input_shape, w.num_classes, 3)
    pos = torch.arange(64)
    whole, loss1, none = tt.round_gradient(model, w.loss(), digits, pos, 1)
    split, loss8, stats = tt.round_gradient(model, w.loss(), digits, pos, 8)
    assert math.isnan(none.b_simple) and math.isnan(none.tr_sigma) and math.isnan(none.grad_sq)
    assert math.isfinite(stats.b_simple) and stats.b_simple == pytest.approx(stats.tr_sigma / stats.grad_sq)
    # the old rule's EMA of B_simple skips what is not a positive number
    assert tt.ratio_ema(None, math.nan) is None and tt.ratio_ema(2.0, 4.0, 0.75) == pytest.approx(2.5)
    assert loss8 == pytest.approx(loss1, rel=1e-5)
    assert max(float((a - b).abs().max()) for a, b in zip(whole, split)) < 1e-6


def test_the_fleet_clock_is_the_slowest_device_plus_the_round_latency():
    clock = tt.FleetClock({1: 0.01, 4: 0.02, 16: 0.05, 64: 0.2}, model_bytes=2.5e6)
    phone = tt.FLEET[0]  # B = 1: one device, the first of the fleet
    expected = float(clock.model(1)) / phone.speed + comm_seconds(2.5e6, phone) + tt.ROUND_LATENCY_S
    assert clock(1) == pytest.approx(expected, rel=1e-9)
    old_phone = tt.FLEET[3]  # with 4+ devices the 10 Mbit/s link of the old phone sets the pace
    assert clock(64) >= comm_seconds(2.5e6, old_phone) + tt.ROUND_LATENCY_S
    assert clock(512) >= clock(64)


def test_a_batch_step_run_follows_its_schedule_and_sees_every_epoch(digits):
    clock = tt.FleetClock({1: 0.01, 4: 0.02, 16: 0.05, 64: 0.2}, model_bytes=1e5)
    n = len(digits.y_train)
    rec = tt.train(tm.METHODS["batch-step"], 0.1, 1, digits, clock)
    steps, planned = tm.step_schedule(n)
    batches = [scheduled_batch(64, steps, r) for r in range(1, planned + 1)]
    rounds = int(np.searchsorted(np.cumsum(batches), 2 * n)) + 1  # the first round that completes 2 epochs
    assert not rec["diverged"] and rec["rounds"] == rounds and planned - 1 <= rounds <= planned
    assert rec["samples_seen"] == sum(batches[:rounds]) and 2 * n <= rec["samples_seen"] < 2 * n + 512
    assert [c["global_batch"] for c in rec["curve"]][-1] == 512
    assert rec["virtual_s"] == pytest.approx(sum(clock(b) for b in batches[:rounds]), rel=1e-9)
    assert 0.5 < rec["final_val_accuracy"] <= 1.0  # chance is 0.1


def test_post_local_rounds_of_one_step_are_the_large_batch_steps(digits):
    clock = tt.FleetClock({1: 0.01, 4: 0.02, 16: 0.05, 64: 0.2}, model_bytes=1e5)
    large = tt.train(tm.METHODS["large"], 0.05, 1, digits, clock)
    one = tt.train(tm.Method("post-local-1", "cosine", tm.LARGE, local_steps=1), 0.05, 1, digits, clock)
    assert one["rounds"] == large["rounds"] == tm.planned_rounds(tm.METHODS["large"], len(digits.y_train))
    assert one["samples_seen"] == large["samples_seen"]
    for a, b in zip(one["curve"], large["curve"]):  # same data order, same steps: the same model to rounding
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 1 / len(digits.y_val)
    assert one["final_test_accuracy"] == pytest.approx(large["final_test_accuracy"], abs=0.006)


def test_batch_step_local_rounds_of_one_step_are_batch_steps_steps(digits):
    clock = tt.FleetClock({1: 0.01, 4: 0.02, 16: 0.05, 64: 0.2}, model_bytes=1e5)
    step = tt.train(tm.METHODS["batch-step"], 0.025, 1, digits, clock)
    one = tt.train(tm.Method("local-1", "constant", steps=tm.STEP_BATCHES, local_steps=1, switch=0.0,
                             local_clients=tm.CLIENTS), 0.025, 1, digits, clock)
    assert one["rounds"] == step["rounds"] and one["samples_seen"] == step["samples_seen"]
    for a, b in zip(one["curve"], step["curve"]):  # 8 clients' one step each, averaged: the union batch's step
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 1 / len(digits.y_val)
    assert one["final_test_accuracy"] == pytest.approx(step["final_test_accuracy"], abs=0.006)


def test_fedavgm_rounds_of_one_step_are_batch_steps_steps_and_two_steps_upload_weights_only(digits):
    clock = tt.FleetClock({1: 0.01, 4: 0.02, 16: 0.05, 64: 0.2}, model_bytes=1e5)
    step = tt.train(tm.METHODS["batch-step"], 0.025, 1, digits, clock)
    one = tt.train(tm.Method("fedavgm-1", "constant", steps=tm.STEP_BATCHES, local_steps=1, switch=0.0,
                             local_clients=tm.CLIENTS, local_momentum=False), 0.025, 1, digits, clock)
    assert one["rounds"] == step["rounds"]
    for a, b in zip(one["curve"], step["curve"]):  # plain SGD step, server momentum: the union batch's step
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 1 / len(digits.y_val)
    method = tm.METHODS["batch-step-fedavgm-2"]
    plan = tm.local_rounds(method, len(digits.y_train))
    two = tt.train(method, 0.025, 1, digits, clock)
    assert two["rounds"] == len(plan) and two["virtual_s"] == pytest.approx(
        sum(clock.local(h, b, tm.CLIENTS, velocity=False) for b, h in plan), rel=1e-9)
    assert clock.local(2, 512, 8, velocity=False) < clock.local(2, 512, 8)  # half the upload
    assert 0.5 < two["final_val_accuracy"] <= 1.0


def test_a_fedavgm_round_is_the_server_momentum_step_on_the_clients_mean_pseudo_gradient(digits):
    w = WORKLOADS["digits"]
    model, loss_fn = build_model("mlp", w.input_shape, w.num_classes, 3), w.loss()
    params, draws, lr = list(model.parameters()), [torch.arange(0, 16), torch.arange(16, 32)], 0.2
    w0 = [p.detach().clone() for p in params]
    finals = []
    for k in range(2):  # each client: two plain SGD steps on its half of each draw, from w_0
        with torch.no_grad():
            for p, t in zip(params, w0):
                p.copy_(t)
        for pos in draws:
            part = pos.chunk(2)[k]
            batch_gradient(model, loss_fn, digits.inputs, digits.x_train[part], digits.y_train[part])
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad, alpha=-lr)
        finals.append([p.detach().clone() for p in params])
    v = [(a - (b + c) / 2) / lr + tm.WEIGHT_DECAY * a for a, b, c in zip(w0, *finals)]  # first step: v = d
    with torch.no_grad():
        for p, t in zip(params, w0):
            p.copy_(t)
    opt = ServerSGD(momentum=tm.MOMENTUM, weight_decay=tm.WEIGHT_DECAY)
    tt.local_round(model, loss_fn, digits, opt, draws, [lr, lr], clients=2, momentum=False)
    for p, a, vel, got in zip(params, w0, v, opt.velocity):
        assert torch.allclose(got, vel, rtol=1e-4, atol=1e-6)
        assert torch.allclose(p.detach(), a - lr * vel, rtol=1e-5, atol=1e-6)


def test_a_batch_step_local_run_takes_its_plan_and_pays_h_steps_a_round(digits):
    clock = tt.FleetClock({1: 0.01, 4: 0.02, 16: 0.05, 64: 0.2}, model_bytes=1e5)
    n, method = len(digits.y_train), tm.METHODS["batch-step-local"]
    plan = tm.local_rounds(method, n)
    rec = tt.train(method, 0.025, 1, digits, clock)
    assert rec["rounds"] == len(plan) == tm.planned_rounds(method, n) < tm.planned_rounds(tm.METHODS["batch-step"], n) / 4
    assert rec["samples_seen"] == sum(b * h for b, h in plan) >= 2 * n
    assert rec["virtual_s"] == pytest.approx(sum(clock.local(h, b, tm.CLIENTS) for b, h in plan), rel=1e-9)
    assert clock.local(8, 64, 8) < clock.local(8, 512, 8)  # 8 examples a step on each device against 64
    assert 0.5 < rec["final_val_accuracy"] <= 1.0  # chance is 0.1
    with pytest.raises(ValueError, match="split evenly over 8 clients"):
        tt.local_round(None, None, digits, None, [torch.arange(12)], [0.1], clients=8)


def test_a_post_local_run_takes_h_steps_a_round_after_the_switch(digits):
    clock = tt.FleetClock({1: 0.01, 4: 0.02, 16: 0.05, 64: 0.2}, model_bytes=1e5)
    n, method = len(digits.y_train), tm.METHODS["post-local"]
    s, local = tm.local_phase(method, n)
    assert s == math.ceil(n / 512) and local == math.ceil((2 * n - 512 * s) / 512)  # half of 2 epochs, then the rest
    rec = tt.train(method, 0.05, 1, digits, clock)
    last = local - 16 * (math.ceil(local / 16) - 1)  # the last local round takes the steps left
    assert rec["rounds"] == s + math.ceil(local / 16) == tm.planned_rounds(method, n)
    assert rec["samples_seen"] == 512 * (s + local) and 2 * n <= rec["samples_seen"] < 2 * n + 512
    expected = s * clock(512) + (math.ceil(local / 16) - 1) * clock.local(16) + clock.local(last)
    assert rec["virtual_s"] == pytest.approx(expected, rel=1e-9)
    assert clock.local(16) > clock.local(1) > tt.ROUND_LATENCY_S
    assert 0.2 < rec["final_val_accuracy"] <= 1.0  # 6 steps of 512 at most: above chance (0.1), not trained


def _run(method: str, seed: int, lr: float, accs: list[float], test: float, rounds_per_eval: int) -> dict:
    curve = [{"round": (i + 1) * rounds_per_eval, "samples_seen": (i + 1) * 10_000,
              "virtual_total_s": 10.0 * (i + 1) * rounds_per_eval, "val_accuracy": a} for i, a in enumerate(accs)]
    return {"method": method, "seed": seed, "lr": lr, "final_val_accuracy": accs[-1], "final_test_accuracy": test,
            "epochs": 40.0, "rounds": rounds_per_eval * len(accs), "virtual_s": curve[-1]["virtual_total_s"],
            "mean_batch": 1.0, "diverged": False, "curve": curve}


def test_target_rounds_to_it_and_the_goal_check():
    runs = [_run("small", s, 0.0125, [0.3, 0.5, 0.6, 0.62], 0.61, 100) for s in (1, 2)]
    runs += [_run("large", s, 0.05, [0.4, 0.55, 0.58], 0.58, 10) for s in (1, 2)]
    runs += [_run("batch-step", 0, lr, [0.1, v], 0.5, 10) for lr, v in ((0.0125, 0.5), (0.025, 0.6), (0.05, 0.4))]
    runs += [_run("batch-step", s, 0.025, accs, 0.607, 20) for s, accs in ((1, [0.5, 0.62, 0.63]), (2, [0.5, 0.6, 0.61]))]
    runs += [_run("batch-step", 1, 0.05, [0.9, 0.9], 0.9, 1)]  # not the validation choice: ignored
    df, curves, target = tta.results(runs)
    assert target == pytest.approx(0.615)
    assert tta.chosen_lr("batch-step", runs) == 0.025
    assert sorted(df.method.unique()) == ["batch-step", "large", "small"] and len(df) == 6
    small = df[df.method == "small"]
    assert (small.rounds_to_target == 400).all() and (small.virtual_s_to_target == 4000.0).all()
    assert df[df.method == "large"].rounds_to_target.isna().all()
    assert df[df.method == "batch-step"].rounds_to_target.tolist()[0] == 40  # seed 2 never reaches 0.615
    assert np.isnan(df[df.method == "batch-step"].rounds_to_target.tolist()[1])
    s = tta.summary(df, curves, target).set_index("method")
    assert s.loc["batch-step", "curve_rounds"] == 60 and s.loc["small", "curve_rounds"] == 400  # means 0.61, 0.62
    assert s.loc["batch-step", "round_ratio"] == pytest.approx(60 / 400)
    assert s.loc["batch-step", "vs_small_pp"] == pytest.approx(-0.3)
    lines = tta.goal_lines(s.reset_index())
    assert lines[0].startswith("large: seeds reaching 0/2, mean curve: rounds xnan") and lines[0].endswith("not reached")
    assert lines[1].startswith("batch-step: seeds reaching 1/2, mean curve: rounds x0.150") and lines[1].endswith("REACHED")
    assert np.isclose(curves[curves.method == "small"].val_accuracy.max(), 0.62)


def test_bad_command_line_values_are_named_before_any_training():
    with pytest.raises(SystemExit, match="--methods: 'huge'"):
        tta.main(["--methods", "huge", "--data-dir", "x"])
    with pytest.raises(SystemExit, match=r"--tune-lrs: '0.1': each must be one of 0.0125, 0.025, 0.05"):
        tta.main(["--tune", "--tune-lrs", "0.1", "--data-dir", "x"])


def test_local_rounds_with_the_velocity_from_the_weights_keep_the_weights_and_upload_once(digits):
    w = WORKLOADS["digits"]
    draws, lrs = [torch.arange(0, 16), torch.arange(16, 32)], [0.2, 0.1]
    out = {}
    for send in (True, False):
        model, loss_fn = build_model("mlp", w.input_shape, w.num_classes, 3), w.loss()
        opt = ServerSGD(momentum=tm.MOMENTUM, weight_decay=tm.WEIGHT_DECAY,
                        velocity=[torch.full_like(p, 0.01) for p in model.parameters()])
        w0, v0 = [p.detach().clone() for p in model.parameters()], [v.clone() for v in opt.velocity]
        tt.local_round(model, loss_fn, digits, opt, draws, lrs, clients=2, send_velocity=send)
        out[send] = ([p.detach().clone() for p in model.parameters()], opt.velocity)
    for a, b in zip(out[True][0], out[False][0]):  # the same clients' runs: the same mean weights
        torch.testing.assert_close(a, b)
    for got, want in zip(out[False][1], velocity_from_weights(w0, out[False][0], v0, lrs, tm.MOMENTUM)):
        torch.testing.assert_close(got, want)
    method = tm.METHODS["batch-step-local-2-weights"]
    clock = tt.FleetClock({1: 0.01, 4: 0.02, 16: 0.05, 64: 0.2}, model_bytes=1e5)
    plan = tm.local_rounds(method, len(digits.y_train))
    rec = tt.train(method, 0.025, 1, digits, clock)
    assert rec["virtual_s"] == pytest.approx(sum(clock.local(h, b, tm.CLIENTS, velocity=False) for b, h in plan))
    assert 0.5 < rec["final_val_accuracy"] <= 1.0


def test_adacomm_takes_two_steps_a_round_while_b_is_at_most_128_and_one_after():
    method = tm.METHODS["batch-step-adacomm"]
    plan = tm.local_rounds(method, 5000)
    assert len(plan) == 391 + 196 + 196 + 98 == tm.planned_rounds(method, 5000)
    assert sum(h for _, h in plan) == tm.planned_steps(method, 5000) == tm.step_schedule(5000)[1]
    assert {h for b, h in plan if b <= 128} == {1, 2} and {h for b, h in plan if b > 128} == {1}
    assert plan[:587] == tm.local_rounds(tm.METHODS["batch-step-local-2-weights"], 5000)[:587]


def test_tail_averaging_scores_the_mean_of_the_last_rounds_and_leaves_training_alone(digits):
    clock = tt.FleetClock({1: 0.01, 4: 0.02, 16: 0.05, 64: 0.2}, model_bytes=1e5)
    plain = tt.train(tm.METHODS["batch-step-local-2-weights"], 0.025, 1, digits, clock)
    swa = tt.train(tm.METHODS["batch-step-local-2-swa"], 0.025, 1, digits, clock)
    assert swa["rounds"] == plain["rounds"] and swa["samples_seen"] == plain["samples_seen"]
    # the rounds that end past 3/4 of the epochs' examples
    n = len(digits.y_train)
    seen = np.cumsum([b * h for b, h in tm.local_rounds(tm.METHODS["batch-step-local-2-swa"], n)])[:swa["rounds"]]
    assert swa["averaged_rounds"] == int((seen > 0.75 * 2 * n).sum()) >= 2
    assert swa["final_test_accuracy_last"] == pytest.approx(plain["final_test_accuracy"], abs=0.006)
    assert swa["curve"][0]["val_accuracy"] == pytest.approx(plain["curve"][0]["val_accuracy"], abs=0.006)
    assert "val_accuracy_last" not in swa["curve"][0] and "val_accuracy_last" in swa["curve"][-1]
    assert swa["final_test_accuracy"] != swa["final_test_accuracy_last"]  # the mean is another model
    assert 0.5 < swa["final_test_accuracy"] <= 1.0
