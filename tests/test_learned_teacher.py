"""The learned teacher fits something measurable, and every new teacher survives checkpoint/resume."""

from __future__ import annotations

import math

import pytest
import torch

from tests.resume import crash_then_resume, max_model_difference
from strategies.learned_teacher import LearnedTeacher
from strategies.teachers import TeacherInput
from workloads.config import RunConfig
from workloads.validation import ValidationGradient

CURVATURE = (1.0, 100.0)  # two "layers" of a quadratic L(w) = sum_l h_l |w_l|^2 / 2


def _quadratic_run(hyper_lr: float, rounds: int = 300, lr: float = 0.019):
    """Plain SGD on the quadratic through the teacher; validation loss = training loss, no noise.

    At lr = 0.019 layer 0 steps too short (lr h = 0.019) and layer 1 overshoots (lr h = 1.9:
    every step flips its sign and shrinks it only by 0.9).
    """
    cfg = RunConfig.from_mapping({"teacher": "learned", "teacher-hyper-lr": hyper_lr, "teacher-small-batch": 8})
    h = [torch.full((4,), c, dtype=torch.float64) for c in CURVATURE]
    teacher = LearnedTeacher(cfg, lambda w: [hl * wl for hl, wl in zip(h, w)], names=["a", "b"])
    w = [torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]
    for rnd in range(1, rounds + 1):
        g = [hl * wl for hl, wl in zip(h, w)]
        out = teacher(TeacherInput(g, [g, g], [8, 8], rnd, lr=lr, params=w))  # no client spread: no noise
        w = [wl - lr * ul for wl, ul in zip(w, out.grad)]
    loss = sum(float((hl * wl * wl).sum()) / 2 for hl, wl in zip(h, w))
    return teacher, out, loss


def test_gains_grow_where_steps_are_short_and_shrink_where_they_overshoot():
    teacher, out, loss = _quadratic_run(hyper_lr=0.05)
    short, overshoot = teacher.gains
    assert short > 4.0  # lr h gamma stays far below 1: validation keeps agreeing with the last step
    assert overshoot < 1.0 and 0.019 * 100 * overshoot < 1.2  # pulled back to the edge of overshooting
    assert out.metrics["gain_a"] == pytest.approx(short) and out.metrics["gain_b"] == pytest.approx(overshoot)
    _, _, fixed_loss = _quadratic_run(hyper_lr=0.0)
    assert fixed_loss > 1e3 * loss  # the fitted gains reach a far lower loss than gains fixed at 1
    fixed, _, _ = _quadratic_run(hyper_lr=0.0)
    assert fixed.gains == [1.0, 1.0]


def test_learned_state_round_trip_continues_identically():
    cfg = RunConfig.from_mapping({"teacher": "learned", "teacher-small-batch": 4, "teacher-hyper-lr": 0.1})
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(6, generator=gen, dtype=torch.float64)
    val_grad = lambda w: [w[0] - target]  # noqa: E731
    grads = [[[torch.randn(6, generator=gen, dtype=torch.float64)] for _ in range(4)] for _ in range(8)]
    w = [torch.zeros(6, dtype=torch.float64)]

    def step(teacher, rnd, w):
        g = grads[rnd - 1]
        mean = [sum(x[0] for x in g) / 4]
        return [w[0] - 0.1 * teacher(TeacherInput(mean, g, [8] * 4, rnd, params=w)).grad[0]]

    a = LearnedTeacher(cfg, val_grad)
    wa = w
    for rnd in range(1, 9):
        wa = step(a, rnd, wa)
    b = LearnedTeacher(cfg, val_grad)
    wb = w
    for rnd in range(1, 5):
        wb = step(b, rnd, wb)
    c = LearnedTeacher(cfg, val_grad)
    c.load_state_dict(b.state_dict())
    for rnd in range(5, 9):
        wb = step(c, rnd, wb)
    assert torch.equal(wa[0], wb[0]) and a.log_gains == c.log_gains and a.log_gains != [0.0]


def test_validation_gradient_uses_the_validation_split_and_resumes_its_order(data_dir):
    cfg = RunConfig.from_mapping({"dataset": "digits", "teacher": "learned"})
    a, b = ValidationGradient(cfg, 32), ValidationGradient(cfg, 32)
    from workloads.models import build_model

    params = [p.detach() for p in build_model("mlp", (1, 8, 8), 10, 1).parameters()]
    assert a.names == ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    for _ in range(6):  # 144 validation examples: this crosses an epoch of the shuffle
        a(params)
    b.load_state_dict(a.state_dict())
    assert a.epoch == 1 and all(torch.equal(x, y) for x, y in zip(a(params), b(params)))


@pytest.mark.parametrize("teacher, extra", [
    ("post-local", {"teacher-switch": 3, "teacher-local-steps": 3}),
    ("swap", {"teacher-local-steps": 4}),
    ("signed-noise", {"teacher-small-batch": 8}),
    ("learned", {"teacher-small-batch": 8, "teacher-val-batch": 16}),
])
def test_a_run_resumed_after_a_failed_round_ends_with_the_uninterrupted_model(tmp_path, teacher, extra):
    config = {"teacher": teacher, "num-server-rounds": 6, "checkpoint-every": 2, "eval-every": 3,
              "global-batch-size": 64, "lr": 0.2, "round-retries": 0, "max-failed-rounds": 0, **extra}
    a, b = crash_then_resume(config, tmp_path, crash_round=6, checkpoint_round=4)
    assert max_model_difference(a, b) == 0.0
    assert all(math.isfinite(float(v.abs().max())) for v in torch.load(a / "model.pt").values())
