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
