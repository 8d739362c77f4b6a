"""Teachers and noise statistics on synthetic problems with known gradient covariance."""

from __future__ import annotations

import math

import pytest
import torch

from strategies.gradient_noise import AdaScaleTeacher, NoiseTeacher
from strategies.noise_scale import noise_stats
from strategies.server_opt import ServerSGD
from strategies.teachers import LARS_TRUST, LarsTeacher, ScalingTeacher, StepTeacher, TeacherInput, parse_steps
from workloads.config import ConfigError, RunConfig

DIM = 24
BATCHES = [16, 16, 32, 8, 24, 16, 8, 8]  # b_i of K = 8 clients, B = 128


def _problem(seed=0):
    """A true gradient mu and a per-example covariance Sigma = L L^T with spread eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(DIM, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))
    chol = q * torch.logspace(-1, 1, DIM, dtype=torch.float64).sqrt()
    return mu, chol, gen


def _client_grads(mu, chol, gen, batches):
    """g_i = mean of b_i per-example gradients ~ N(mu, Sigma): N(mu, Sigma / b_i) exactly."""
    return [[mu + chol @ torch.randn(DIM, generator=gen, dtype=torch.float64) / math.sqrt(b)] for b in batches]


def _aggregate(client_grads, batches):
    total = sum(batches)
    return [sum(b * g[0] for b, g in zip(batches, client_grads)) / total]


def test_noise_stats_are_unbiased():
    mu, chol, gen = _problem()
    tr_sigma = float((chol @ chol.T).trace())
    draws = [noise_stats(_aggregate(g, BATCHES), g, BATCHES)
             for g in (_client_grads(mu, chol, gen, BATCHES) for _ in range(3000))]
    mean_tr = sum(d.tr_sigma for d in draws) / len(draws)
    mean_sq = sum(d.grad_sq for d in draws) / len(draws)
    assert abs(mean_tr / tr_sigma - 1) < 0.05
    assert abs(mean_sq / float(mu @ mu) - 1) < 0.05


def test_noise_teacher_output_has_mean_mu_and_small_batch_covariance():
    mu, chol, gen = _problem(1)
    small = 8
    teacher = NoiseTeacher(small_batch=small, seed=0)
    outs = []
    for rnd in range(4000):
        g = _client_grads(mu, chol, gen, BATCHES)
        G = _aggregate(g, BATCHES)
        outs.append(teacher(TeacherInput(G, g, BATCHES, rnd + 1)).grad[0])
    outs = torch.stack(outs)
    target_trace = float((chol @ chol.T).trace()) / small
    err = float((outs.mean(0) - mu).norm())
    assert err < 3 * math.sqrt(target_trace / len(outs)), f"mean off by {err:.3f}"
    cov_trace = float(outs.var(0, unbiased=True).sum())
    assert abs(cov_trace / target_trace - 1) < 0.10, f"trace {cov_trace:.3f} vs {target_trace:.3f}"
    # plain G has only Sigma / B: the teacher really adds noise
    assert target_trace / 4 > float((chol @ chol.T).trace()) / sum(BATCHES)


def test_noise_teacher_mean_over_signs_is_G():
    mu, chol, gen = _problem(2)
    g = _client_grads(mu, chol, gen, BATCHES)
    G = _aggregate(g, BATCHES)
    teacher = NoiseTeacher(small_batch=8, seed=3)
    mean = sum(teacher(TeacherInput(G, g, BATCHES, 1)).grad[0] for _ in range(4000)) / 4000
    spread = float(torch.stack([gi[0] - G[0] for gi in g]).norm())
    assert float((mean - G[0]).norm()) < 0.05 * spread
    assert torch.equal(G[0], _aggregate(g, BATCHES)[0])  # input left untouched


def test_adascale_gain_matches_closed_form():
    cfg = RunConfig.from_mapping({"teacher": "adascale", "teacher-small-batch": 16, "teacher-ema": 0.0,
                                  "schedule": "constant", "warmup-rounds": 0, "lr": 0.1, "num-server-rounds": 10})
    G = [torch.tensor([3.0, 4.0], dtype=torch.float64)]  # |G|^2 = 25
    devs = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([0.0, -2.0])]
    batches = [32, 32, 32, 32]  # B = 128, S = 8
    client = [[G[0] + d.double()] for d in devs]
    stats = noise_stats(G, client, batches)
    tr = sum(32 * float(d @ d) for d in devs) / 3  # = 32 * 10 / 3
    assert stats.tr_sigma == pytest.approx(tr)
    assert stats.grad_sq == pytest.approx(25 - tr / 128)
    var, sqr, scale = tr / 16, 25 - tr / 128, 8.0
    expected = (var + sqr) / (var / scale + sqr)
    out = AdaScaleTeacher(cfg)(TeacherInput(G, client, batches, 1, lr=0.1, stats=stats))
    assert out.lr_scale == pytest.approx(expected)
    assert 1.0 < expected < scale
    assert out.metrics["tau"] == pytest.approx(expected / scale)


def test_adascale_gain_limits():
    """No gradient noise: a large batch is worth one small step (r = 1). Noise dominating the
    signal: it is worth S small steps (r = S, linear scaling)."""
    cfg = RunConfig.from_mapping({"teacher": "adascale", "teacher-small-batch": 16, "teacher-ema": 0.0,
                                  "schedule": "cosine", "warmup-rounds": 0, "lr": 0.1, "num-server-rounds": 10})
    G = [torch.tensor([3.0, 4.0], dtype=torch.float64)]
    quiet = [[G[0].clone()] for _ in range(4)]
    teacher = AdaScaleTeacher(cfg)
    for rnd in (1, 2, 3):
        out = teacher(TeacherInput(G, quiet, [32] * 4, rnd, lr=0.05, stats=noise_stats(G, quiet, [32] * 4)))
        assert out.metrics["scale"] == pytest.approx(1.0)
    assert teacher.tau == pytest.approx(3 / 8)  # the schedule advanced 3 small steps, not 3 rounds
    noisy = [[G[0] + s * torch.tensor([1e4, 0.0], dtype=torch.float64)] for s in (1, -1, 1, -1)]
    out = AdaScaleTeacher(cfg)(TeacherInput(G, noisy, [32] * 4, 1, lr=0.1, stats=noise_stats(G, noisy, [32] * 4)))
    assert out.metrics["scale"] == pytest.approx(8.0)
    assert out.lr_scale == pytest.approx(8.0)  # round 1 of the cosine schedule: eta = lr


def test_step_schedule_and_scaling_rules():
    assert parse_steps("0:4.0,300:2.0,600:1.0", 1000) == [(0, 4.0), (300, 2.0), (600, 1.0)]
    assert parse_steps("0:4,0.25:2,0.5:1", 100) == [(0, 4.0), (25, 2.0), (50, 1.0)]
    step = StepTeacher("0:4,0.25:2,0.5:1", 100)
    assert [step.multiplier(r) for r in (1, 25, 26, 50, 51, 100)] == [4.0, 4.0, 2.0, 2.0, 1.0, 1.0]
    G = [torch.ones(3)]
    assert torch.equal(step(TeacherInput(G, [G], [10], 30)).grad[0], torch.full((3,), 2.0))
    for bad in ("1:4", "0:4,0.5", "0:4,0.6:2,0.5:1", "0:-1", "x"):
        with pytest.raises(ConfigError, match="'teacher-steps'"):
            parse_steps(bad, 100)
    lin = ScalingTeacher(64, 1.0, "linear")(TeacherInput(G, [G] * 8, [128] * 8, 1))
    sqrt = ScalingTeacher(64, 0.5, "sqrt")(TeacherInput(G, [G] * 8, [128] * 8, 1))
    assert lin.lr_scale == pytest.approx(16.0) and sqrt.lr_scale == pytest.approx(4.0)


def test_lars_update_is_trust_times_regularised_gradient():
    w = [torch.tensor([[3.0, 4.0]]), torch.tensor([1.0])]  # a weight matrix (|w| = 5) and a bias
    g = [torch.tensor([[0.0, 0.5]]), torch.tensor([0.2])]  # |g| = 0.5
    wd, lr = 0.01, 2.0
    out = LarsTeacher()(TeacherInput(g, [g], [8], 1, lr=lr, params=w, weight_decay=wd))
    trust = LARS_TRUST * 5.0 / (0.5 + wd * 5.0)
    assert out.metrics["scale"] == pytest.approx(trust)
    before = [t.clone() for t in w]
    ServerSGD(momentum=0.0, weight_decay=wd).step(w, out.grad, lr)
    torch.testing.assert_close(w[0], before[0] - lr * trust * (g[0] + wd * before[0]))
    torch.testing.assert_close(w[1], before[1] - lr * (g[1] + wd * before[1]))  # bias: plain SGD


def test_a_teacher_plan_sets_local_steps_and_server_momentum():
    """Phase-switching teachers (post-local SGD, SWAP) set H and the server momentum per round."""
    from flwr.app import ConfigRecord

    from client_app.app import app as client_app
    from strategies.large_batch import LargeBatchStrategy
    from strategies.teachers import IdentityTeacher, RoundPlan
    from flb.inprocess import FakeGrid, client_context, reply_via_client, state_arrays
    from workloads.models import build_model

    class Switch(IdentityTeacher):
        def plan(self, server_round: int, batches) -> RoundPlan:
            return RoundPlan(local_steps=3, server_momentum=0.0) if server_round > 1 else RoundPlan()

    run_config = {"global-batch-size": 30, "momentum": 0.9}
    cfg = RunConfig.from_mapping(run_config)
    model = build_model("mlp", (1, 8, 8), 10, 0)
    strategy = LargeBatchStrategy(cfg, model.state_dict(), [n for n, _ in model.named_parameters()], Switch())
    steps = []
    for rnd in (1, 2):
        (msg,) = list(strategy.configure_train(rnd, state_arrays(strategy.state), ConfigRecord(), FakeGrid([9])))
        steps.append(msg.content["config"]["local-steps"])
        strategy.aggregate_train(rnd, [reply_via_client(client_app, msg, client_context(9, 0, 1, run_config))])
        assert strategy.plan.momentum == (0.9 if rnd == 1 else 0.0)
    assert steps == [1, 3] and strategy.server_state.samples_seen == 30 + 3 * 30 and strategy.server_state.drawn == {0: 120}
