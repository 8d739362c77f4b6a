"""Aggregation, server optimizer and learning-rate schedule, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from strategies.aggregation import aggregate_buffers, weighted_mean
from strategies.server_opt import ServerSGD, lr_at


def test_weighted_mean_matches_hand_computation():
    # Prepare: two clients, two tensors each, weights = local batch sizes.
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    b = [torch.tensor([5.0, -2.0]), torch.tensor([[0.0]])]
    # Execute
    out = weighted_mean([a, b], [3, 1])
    # Assert: (3*a + 1*b) / 4
    torch.testing.assert_close(out[0], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(out[1], torch.tensor([[2.25]]))
    assert a[0].tolist() == [1.0, 2.0]  # inputs untouched


@pytest.mark.parametrize("weights", [[], [1.0], [0.0, 0.0], [-1.0, 2.0]])
def test_weighted_mean_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        weighted_mean([[torch.ones(1)], [torch.ones(1)]], weights)


def test_buffers_average_floats_and_keep_max_count():
    c1 = {"bn.running_mean": torch.tensor([0.0, 4.0]), "bn.num_batches_tracked": torch.tensor(7)}
    c2 = {"bn.running_mean": torch.tensor([2.0, 0.0]), "bn.num_batches_tracked": torch.tensor(9)}
    out = aggregate_buffers([c1, c2], [1, 3])
    torch.testing.assert_close(out["bn.running_mean"], torch.tensor([1.5, 1.0]))
    assert out["bn.num_batches_tracked"].item() == 9
    assert out["bn.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.5, 1e-2)])
def test_server_sgd_matches_torch_sgd(momentum, wd):
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(3)]
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=momentum, weight_decay=wd)
    ours = ServerSGD(momentum=momentum, weight_decay=wd)
    for step in range(6):
        grads = [torch.randn_like(p) for p in params]
        lr = 0.1 * (step + 1) / 6
        for group in opt.param_groups:
            group["lr"] = lr
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        ours.step(params, grads, lr)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r.detach(), rtol=1e-6, atol=1e-7)


def test_lr_schedule_values():
    # warm-up: linear from lr/W to lr
    assert lr_at(1, 10, 0.4, 4, "cosine") == pytest.approx(0.1)
    assert lr_at(4, 10, 0.4, 4, "cosine") == pytest.approx(0.4)
    # first round after warm-up is the peak; cosine halfway is half the peak
    assert lr_at(5, 10, 0.4, 4, "cosine") == pytest.approx(0.4)
    assert lr_at(8, 10, 0.4, 4, "cosine") == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr_at(10, 10, 0.4, 4, "linear") == pytest.approx(0.4 / 6)
    assert all(lr_at(r, 10, 0.4, 0, "constant") == 0.4 for r in range(1, 11))
    values = [lr_at(r, 50, 1.0, 0, "cosine") for r in range(1, 51)]
    assert all(x > y for x, y in zip(values, values[1:])) and values[-1] > 0


def test_noise_statistics_from_server_norms_equal_the_two_pass_ones():
    from strategies.aggregation import weighted_mean
    from strategies.noise_scale import noise_stats
    from strategies.reply_check import check_tensors
    from strategies.round_plan import RoundPlan, round_stats

    gen = torch.Generator().manual_seed(3)
    shapes = {"w": (64, 32), "b": (64,)}
    batches = [16, 16, 32, 8, 24, 16, 8, 8]
    mu = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    clients = [[mu[k] + torch.randn(s, generator=gen) / b ** 0.5 for k, s in shapes.items()] for b in batches]
    sq = []
    for g in clients:
        parts: list[float] = []
        assert check_tensors("gradient", dict(zip(shapes, g)), shapes, parts) is None
        sq.append(sum(parts))
    G = weighted_mean(clients, batches)
    fast = round_stats(RoundPlan(), G, clients, batches, [0.0] * 8, list(range(8)), sq)
    slow = noise_stats(G, clients, batches)
    assert fast.tr_sigma == pytest.approx(slow.tr_sigma, rel=1e-5)
    assert fast.grad_sq == pytest.approx(slow.grad_sq, rel=1e-5)
    assert fast.b_simple == pytest.approx(slow.b_simple, rel=1e-5)
    same = round_stats(RoundPlan(), G, [G] * 8, batches, [0.0] * 8, list(range(8)), [sum(float(t.double().pow(2).sum()) for t in G)] * 8)
    assert 0.0 <= same.tr_sigma <= 1e-12 * same.grad_sq  # identical clients: rounding only, never negative
