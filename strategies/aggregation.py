"""Aggregation of client gradients and BatchNorm buffers into one global-batch step.

Tyagi (arXiv 2509.10537) combines the clients' local-batch gradients synchronously into the
gradient of one large global batch. With g_i the mean gradient over client i's b_i examples,

    G = sum_i b_i * g_i / sum_i b_i

is the mean gradient over all B = sum_i b_i examples: the large-batch gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def weighted_mean(
    arrays: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]
) -> list[torch.Tensor]:
    """Return ``sum_i w_i * arrays[i] / sum_i w_i`` tensor by tensor.

    Parameters
    ----------
    arrays : sequence of K sequences of tensors
        ``arrays[i][j]`` is tensor j of client i; all clients share shapes.
    weights : sequence of K floats
        Non-negative weights with a positive sum (the local batch sizes b_i, in examples).

    Returns
    -------
    list[torch.Tensor]
        The weighted means, float32, new tensors (inputs are not modified).
    """
    if len(arrays) != len(weights) or not arrays:
        raise ValueError(f"need one weight per client, got {len(arrays)} clients and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or min(weights) < 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    out = [torch.zeros_like(t, dtype=torch.float32) for t in arrays[0]]
    for client, w in zip(arrays, weights):
        for acc, t in zip(out, client):
            acc.add_(t, alpha=w / total)
    return out


def aggregate_buffers(
    buffers: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Aggregate model buffers (BatchNorm running statistics) reported after the local step.

    Floating-point buffers (``running_mean``, ``running_var``) are averaged with the same
    weights as the gradients (b_i), which is the running estimate a single worker would have
    after seeing the clients' batches in parallel. Integer buffers (``num_batches_tracked``)
    are counters: the maximum over clients is kept.
    """
    if not buffers:
        return {}
    names = list(buffers[0])
    out: dict[str, torch.Tensor] = {}
    for name in names:
        values = [b[name] for b in buffers]
        if values[0].is_floating_point():
            out[name] = weighted_mean([[v] for v in values], weights)[0].to(values[0].dtype)
        else:
            out[name] = torch.stack(values).max(dim=0).values
    return out
