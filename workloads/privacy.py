"""L2 clipping of a client's gradient, the client's half of client-level DP (McMahan et al. 2018).

DP-FedSGD bounds each client's contribution by clipping its whole update, all trainable
tensors together, to the L2 norm C:

    clip(g) = g * min(1, C / |g|),    |g| = sqrt(sum_j |g_j|^2)

Here the update is the mean gradient g_i of the client's b_i examples (or, with H > 1 local
steps, its pseudo-gradient (w_0 - w_H) / lr): the gradient itself, not the reply minus the
weights as Flower's DP wrappers clip it. A leaf: the ClientApp and the server (which clips
again, strategies/privacy.py) both use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def global_norm(tensors: Sequence[torch.Tensor]) -> float:
    """|g| = sqrt(sum_j |g_j|^2) over all tensors, accumulated in float64 (gradient units)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors))


def clip_gradient(tensors: Sequence[torch.Tensor], clip: float) -> tuple[list[torch.Tensor], float]:
    """Return (g * min(1, C / |g|), |g|): the clipped tensors (new ones when scaled) and the norm before.

    ``clip`` is C > 0, in the gradient's units. A gradient already within C comes back as the
    same tensors, so clipping twice changes nothing.
    """
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip!r}")
    norm = global_norm(tensors)
    if norm <= clip:
        return list(tensors), norm
    factor = clip / norm
    return [t * factor for t in tensors], norm
