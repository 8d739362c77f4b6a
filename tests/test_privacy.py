"""Client-level DP (DP-FedSGD, McMahan et al. 2018): clipping, the noised fixed-denominator mean, Opacus' accounting."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pandas as pd
import pytest
import torch

from flb.inprocess import run_inprocess
from server_app.preflight import parse_run_config, preflight
from strategies.privacy import (
    add_step, check_private_model, choose_noise_multiplier, epsilon, fixed_weights, noise_generator, private_mean,
    round_noise_multiplier,
)
from strategies.server_state import ServerState
from strategies.server_step import ClientReply, RunSetup, plan_round, server_step
from strategies.teachers import IdentityTeacher
from tests.resume import crash_then_resume, max_model_difference
from workloads.config import ConfigError, RunConfig
from workloads.privacy import clip_gradient, global_norm

DP = {"dp-clip-norm": 1.0, "dp-noise-multiplier": 0.5, "max-norm-ratio": 0}
BASE = {"num-server-rounds": 4, "eval-every": 100, "global-batch-size": 32, "warmup-rounds": 0,
        "schedule": "constant", "lr": 0.05, "clients-per-round": 2, "dp-noise-seed": 3} | DP

pytestmark = pytest.mark.usefixtures("one_thread")


def test_clipping_scales_the_whole_gradient_to_the_norm_and_leaves_a_short_one():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0], [4.0]])]  # |g| = 5 over both tensors
    clipped, norm = clip_gradient(g, 1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(clipped[0], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped[1], torch.tensor([[0.0], [0.8]]))
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    same, norm = clip_gradient(g, 10.0)
    assert norm == pytest.approx(5.0) and all(a is b for a, b in zip(same, g))  # within C: unchanged
    assert all(torch.equal(a, b) for a, b in zip(g, [torch.tensor([3.0, 0.0]), torch.tensor([[0.0], [4.0]])]))
    with pytest.raises(ValueError):
        clip_gradient(g, 0.0)


def test_fixed_denominator_mean_clips_at_the_server_and_keeps_a_dropped_clients_weight():
    # planned b = 10, 10, 5 (b_max 10: w = 1, 1, 0.5; W = 2.5); the third client dropped out
    weights, total = fixed_weights([10, 10], [10, 10, 5])
    assert weights == [1.0, 1.0] and total == 2.5
    g1 = [torch.tensor([0.3, 0.4])]  # |g| = 0.5, within C = 1
    g2 = [torch.tensor([6.0, 8.0])]  # |g| = 10: a client that did not clip; the server clips it to [0.6, 0.8]
    mean, clipped, sigma = private_mean([g1, g2], [10, 10], [10, 10, 5], 1.0, 0.0, noise_generator(0, 1))
    torch.testing.assert_close(mean[0], torch.tensor([0.9, 1.2]) / 2.5)
    torch.testing.assert_close(clipped[1][0], torch.tensor([0.6, 0.8]))
    assert sigma == 0.0


def test_noise_std_of_the_server_step_is_z_c_over_w():
    names, d = ["w"], 5_000
    model = OrderedDict(w=torch.zeros(d))
    z, clip = 1.5, 2.0
    samples = []
    for seed in range(20):
        cfg = RunConfig.from_mapping({"lr": 1.0, "momentum": 0.0, "weight-decay": 0.0, "warmup-rounds": 0,
                                      "schedule": "constant", "seed": seed, "dp-clip-norm": clip,
                                      "dp-noise-multiplier": z, "max-norm-ratio": 0, "dp-noise-seed": seed})
        setup = RunSetup.create(cfg, model, names, IdentityTeacher())
        state, plan = plan_round(ServerState.initial(model, seed, {}), setup, {10: 0, 11: 1, 12: 2}, 3,
                                 {0: 10, 1: 10, 2: 5})  # W = 1 + 1 + 0.5
        replies = [_reply(node, pid, b, torch.zeros(d)) for node, (pid, b) in plan.assigned.items()]
        new, record = server_step(state, replies, plan)
        assert record.row["dp_noise_std"] == pytest.approx(z * clip / 2.5)
        samples.append(-new.model["w"])  # w = 0 - lr (G + noise), G = 0
    noise = torch.cat(samples).double()
    assert float(noise.std()) == pytest.approx(z * clip / 2.5, rel=0.03)  # 100,000 draws: 1.2
    assert abs(float(noise.mean())) < 0.02


def _reply(node: int, pid: int, b: int, grad: torch.Tensor) -> ClientReply:
    metrics = {"num-examples": b, "train-loss": 1.0, "compute-s": 0.01, "peak-mem-mb": math.nan,
               "predicted-peak-mb": 1.0, "budget-mb": 0.0, "max-batch": 0, "micro-batch-size": b, "partition-id": pid}
    return ClientReply(node, pid, grads={"w": grad}, metrics=metrics)


def test_epsilon_is_opacus_own_accountants_and_the_issue_figure():
    from opacus.accountants import PRVAccountant, RDPAccountant

    history = ()
    for _ in range(1000):
        history = add_step(history, 1.0, 0.01)
    assert history == ((1.0, 0.01, 1000),)
    for name, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        direct = cls()
        for _ in range(1000):
            direct.step(noise_multiplier=1.0, sample_rate=0.01)
        assert epsilon(history, 1e-5, name) == pytest.approx(direct.get_epsilon(delta=1e-5), rel=1e-9)
    assert epsilon(history, 1e-5, "rdp") == pytest.approx(2.10, abs=0.01)  # the issue: q 0.01, z 1, 1,000 rounds
    assert epsilon(history, 1e-5, "prv") < epsilon(history, 1e-5, "rdp")  # PRV is the tighter bound
    mixed = add_step(add_step(((1.0, 0.01, 10),), 1.0, 0.02), 1.0, 0.02)
    direct = RDPAccountant()
    for q in [0.01] * 10 + [0.02] * 2:
        direct.step(noise_multiplier=1.0, sample_rate=q)
    assert mixed == ((1.0, 0.01, 10), (1.0, 0.02, 2))
    assert epsilon(mixed, 1e-5, "rdp") == pytest.approx(direct.get_epsilon(delta=1e-5), rel=1e-9)
    assert epsilon((), 1e-5, "rdp") == 0.0 and epsilon(((0.0, 0.5, 3),), 1e-5, "rdp") == math.inf


def test_target_epsilon_chooses_a_z_just_within_the_target():
    z = choose_noise_multiplier(2.0, 1e-5, 0.01, 1000, "rdp")
    eps = epsilon(((z, 0.01, 1000),), 1e-5, "rdp")
    assert 1.98 <= eps <= 2.0 and 0.9 < z < 1.1  # z = 1 gives 2.10, so z is a little above 1
    cfg = RunConfig.from_mapping({"dp-clip-norm": 1.0, "dp-target-epsilon": 2.0, "num-server-rounds": 1000})
    assert round_noise_multiplier(cfg, None, 0.01) == z
    assert round_noise_multiplier(cfg, 3.0, 0.5) == 3.0  # once chosen (round 1, in the checkpoint), kept


@pytest.mark.parametrize("overrides, match", [
    ({"dp-clip-norm": -1.0}, r"'dp-clip-norm' = -1.0: must be >= 0"),
    ({"dp-noise-multiplier": 1.0}, r"'dp-noise-multiplier' = 1.0 with dp-clip-norm = 0"),
    ({"dp-target-epsilon": 3.0}, r"'dp-target-epsilon' = 3.0 with dp-clip-norm = 0"),
    ({"dp-clip-norm": 1.0, "dp-noise-multiplier": 1.0, "dp-target-epsilon": 3.0}, r"'dp-target-epsilon' .* set one"),
    ({"dp-delta": 0.0}, r"'dp-delta' = 0.0: must be in \(0, 1\)"),
    ({"dp-delta": 1.0}, r"'dp-delta' = 1.0: must be in \(0, 1\)"),
    ({"dp-noise-seed": -2}, r"'dp-noise-seed' = -2: must be -1"),
    ({"dp-accountant": "gdp"}, r"'dp-accountant' = 'gdp' is not allowed. Allowed: rdp, prv"),
    (DP | {"secure-aggregation": True}, r"'secure-aggregation' = True with dp-clip-norm = 1"),
    (DP | {"aggregator": "median"}, r"'aggregator' = 'median' with dp-clip-norm = 1 .* Allowed: mean"),
    (DP | {"teacher": "adascale"}, r"'teacher' = 'adascale' with dp-clip-norm = 1 .* Allowed: none, step"),
    (DP | {"batch-policy": "noise"}, r"'batch-policy' = 'noise' with dp-clip-norm = 1"),
    (DP | {"batch-policy": "memory-max"}, r"'batch-policy' = 'memory-max' with dp-clip-norm = 1 .* Allowed: fixed"),
])
def test_bad_dp_settings_are_refused_before_the_run(overrides, match):
    with pytest.raises(ConfigError, match=match):
        parse_run_config(overrides)


def test_the_launcher_refuses_dp_settings_before_starting_anything(tmp_path):
    from flb.launch.run import prepare

    with pytest.raises(ConfigError, match=r"'dp-clip-norm' = -0.5: must be >= 0"):
        prepare("dp-clip-norm=-0.5", "num-supernodes=4", str(tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"'teacher' = 'noise' with dp-clip-norm = 1"):
        prepare("dp-clip-norm=1.0 max-norm-ratio=0 teacher=noise", "num-supernodes=4", str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    cfg, *_ = prepare("dp-clip-norm=1.0 max-norm-ratio=0 dp-target-epsilon=4", "num-supernodes=4", str(tmp_path / "c"))
    assert cfg.dp_target_epsilon == 4.0 and cfg.dp_noise_multiplier == 0.0


def test_a_model_with_batchnorm_buffers_is_refused_under_dp():
    cfg = RunConfig.from_mapping(DP | {"model": "resnet18"})
    with pytest.raises(ConfigError, match=r"'model' = 'resnet18' has buffers \(bn1.running_mean"):
        check_private_model(cfg, ["bn1.running_mean", "bn1.running_var"])
    check_private_model(cfg, [])
    check_private_model(RunConfig(), ["bn1.running_mean"])  # DP off: nothing to refuse


def test_preflight_accepts_dp_on_the_digits_mlp(tmp_path):
    assert preflight(parse_run_config(BASE | {"out-dir": str(tmp_path / "a")}), num_nodes=4) == []


def test_a_dp_run_reports_opacus_epsilon_every_round(tmp_path):
    out = run_inprocess(BASE | {"out-dir": str(tmp_path)}, num_clients=4)
    rounds = pd.read_csv(out / "rounds.csv").set_index("round").loc[1:]
    expected = [epsilon(((0.5, 0.5, r),), 1e-5, "rdp") for r in range(1, 5)]
    assert rounds["dp_epsilon"].tolist() == pytest.approx(expected, rel=1e-5)  # rounds.csv keeps 6 digits
    assert rounds["dp_epsilon"].is_monotonic_increasing and math.isfinite(rounds["dp_epsilon"].iloc[-1])
    assert rounds["dp_sample_rate"].tolist() == [0.5] * 4  # 2 of 4 clients a round
    assert rounds["dp_noise_std"].tolist() == pytest.approx([0.5 * 1.0 / 2] * 4)  # z C / W, W = 2 equal batches
    clients = pd.read_csv(out / "clients.csv")
    assert (clients["grad_norm"] <= 1.0 + 1e-5).all()  # the clients clipped before replying
    assert ((clients["pre_clip_norm"] > 1.0) == (clients["grad_norm"] > 1.0 - 1e-5)).all()
    summary = json.loads((out / "privacy.json").read_text())
    assert summary["rounds"] == 4 and summary["history"] == [[0.5, 0.5, 4]]
    assert summary["dp_epsilon"] == pytest.approx(expected[-1], rel=1e-9)


def test_a_resumed_dp_run_equals_the_uninterrupted_one(tmp_path):
    config = BASE | {"num-server-rounds": 4, "checkpoint-every": 2, "max-failed-rounds": 0, "dp-noise-seed": 7}
    folder_a, folder_b = crash_then_resume(config, tmp_path, crash_round=3, checkpoint_round=2)
    assert max_model_difference(folder_a, folder_b) == 0.0  # the same noise, drawn from the seed and the round
    a = pd.read_csv(folder_a / "rounds.csv").loc[1:]
    b = pd.read_csv(folder_b / "rounds.csv").loc[1:]
    assert b["dp_epsilon"].tolist() == a["dp_epsilon"].tolist()
    assert json.loads((folder_b / "privacy.json").read_text())["history"] == [[0.5, 0.5, 4]]


def test_round_one_chooses_z_for_the_target_and_later_rounds_keep_it():
    cfg = RunConfig.from_mapping({"dp-clip-norm": 1.0, "dp-target-epsilon": 2.0, "num-server-rounds": 1000,
                                  "max-norm-ratio": 0})
    setup = RunSetup.create(cfg, OrderedDict(w=torch.zeros(3)), ["w"], IdentityTeacher())
    state, plan = plan_round(ServerState.initial(OrderedDict(w=torch.zeros(3)), 0, {}), setup,
                             {10: 0, 11: 1, 12: 2, 13: 3}, 1)
    assert plan.sample_rate == 0.25
    assert state.dp_noise_multiplier == choose_noise_multiplier(2.0, 1e-5, 0.25, 1000, "rdp")
    z = state.dp_noise_multiplier
    again, plan = plan_round(ServerState.from_dict(state.to_dict()), setup, {10: 0, 11: 1}, 1)  # a node left
    assert plan.sample_rate == 0.5 and again.dp_noise_multiplier == z  # q follows the round; z stays


def test_the_default_noise_seed_is_a_secret_of_the_run_that_a_resumed_run_keeps():
    cfg = RunConfig.from_mapping({"dp-clip-norm": 1.0, "dp-noise-multiplier": 1.0, "max-norm-ratio": 0, "lr": 1.0,
                                  "momentum": 0.0, "weight-decay": 0.0, "warmup-rounds": 0, "schedule": "constant"})
    model = OrderedDict(w=torch.zeros(50))
    setup = RunSetup.create(cfg, model, ["w"], IdentityTeacher())
    start = ServerState.initial(model, 0, {})
    usable = {10: 0, 11: 1}

    def step(state):
        state, plan = plan_round(state, setup, usable, 2, {0: 4, 1: 4})
        return server_step(state, [_reply(n, p, b, torch.zeros(50)) for n, (p, b) in plan.assigned.items()], plan)[0]

    one, two = step(start), step(start)  # the same run config and seed, two runs
    assert one.dp_noise_seed != two.dp_noise_seed and not torch.equal(one.model["w"], two.model["w"])
    straight = step(one)
    resumed = step(ServerState.from_dict(one.to_dict()))  # the checkpoint holds the secret
    assert resumed.dp_noise_seed == one.dp_noise_seed and torch.equal(resumed.model["w"], straight.model["w"])
