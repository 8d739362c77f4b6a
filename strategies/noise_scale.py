"""Gradient-noise statistics from the clients' spread (McCandlish et al. 2018).

Notation: K clients, client i returns g_i, the mean gradient over its b_i examples;
G = sum_i b_i g_i / B with B = sum_i b_i; Sigma is the per-example gradient covariance and
mu the true gradient. For IID sampling, Cov(g_i - G) = Sigma * (1/b_i - 1/B), hence

    tr_sigma = sum_i b_i |g_i - G|^2 / (K - 1)        unbiased for tr(Sigma)
    grad_sq  = |G|^2 - tr_sigma / B                    unbiased for |mu|^2
    B_simple = tr_sigma / grad_sq                      McCandlish et al. 2018 (arXiv 1812.06162)

(the same two-scale estimator AdaptDL uses, ``gradient_noise_scale.py``). Under non-IID
partitions g_i - G also contains client drift, which inflates tr_sigma.

**From sums** (``noise_stats_from_sums``). A server behind secure aggregation sees only sums:
the aggregate G~ = sum_i m_i b_i g_i / B (m_i = 1 without multipliers), S = sum_i b_i |g_i|^2
(every client adds one scalar, its own b_i |g_i|^2) and the known Q = sum_i m_i^2 b_i. Since
E S = B |mu|^2 + K tr(Sigma) and, for balanced multipliers (sum_i m_i b_i = B),
E |G~|^2 = |mu|^2 + q tr(Sigma) with q = Q / B^2,

    tr_sigma = (S - B |G~|^2) / (K - B q),      grad_sq = |G~|^2 - q tr_sigma,

both unbiased. Without multipliers q = 1/B, and because sum_i b_i |g_i - G|^2 = S - B |G|^2
exactly, these equal the per-client formulas above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workloads.training import sq_norm


@dataclass(frozen=True)
class NoiseStats:
    """Per-round gradient statistics (units: squared gradient norm)."""

    tr_sigma: float  # trace of the per-example gradient covariance (nan with K < 2)
    grad_sq: float  # unbiased |mu|^2 (may be <= 0 when noise dominates)
    b_simple: float  # tr_sigma / grad_sq, examples (nan when grad_sq <= 0)
    grad_norm: float = math.nan  # |G|, the norm of the aggregated gradient


def noise_stats(grad: Sequence[torch.Tensor], client_grads: Sequence[Sequence[torch.Tensor]],
                client_batches: Sequence[int]) -> NoiseStats:
    """Estimate tr(Sigma), |mu|^2 and B_simple from one round's client gradients."""
    k, total = len(client_batches), float(sum(client_batches))
    g_sq = sq_norm(grad)
    if k < 2:
        return NoiseStats(math.nan, g_sq, math.nan, math.sqrt(g_sq))
    spread = 0.0
    for b, g_i in zip(client_batches, client_grads):
        spread += b * sum(float(torch.linalg.vector_norm(gi - G, dtype=torch.float64)) ** 2 for gi, G in zip(g_i, grad))
    tr_sigma = spread / (k - 1)
    grad_sq = g_sq - tr_sigma / total
    b_simple = tr_sigma / grad_sq if grad_sq > 0 else math.nan
    return NoiseStats(tr_sigma, grad_sq, b_simple, math.sqrt(g_sq))


def noise_stats_from_sums(sum_sq: float, total: float, k: int, mean_sq: float, scale_sq: float | None = None) -> NoiseStats:
    """Estimate tr(Sigma), |mu|^2 and B_simple from sums only (see the module docstring).

    Parameters
    ----------
    sum_sq : float
        S = sum_i b_i |g_i|^2, with g_i each client's own (unscaled) mean gradient.
    total : float
        B = sum_i b_i, examples.
    k : int
        K, clients in the sums.
    mean_sq : float
        |G~|^2, the squared norm of the aggregate the server applies.
    scale_sq : float, optional
        Q = sum_i m_i^2 b_i for multipliers m_i with sum_i m_i b_i = B; None: no multipliers (Q = B).

    Returns
    -------
    NoiseStats
        nan statistics with K < 2, or when K = Q / B (the two sums then carry the same information).
    """
    q = (total if scale_sq is None else scale_sq) / total**2
    denominator = k - total * q
    if k < 2 or abs(denominator) < 1e-9:
        return NoiseStats(math.nan, mean_sq, math.nan, math.sqrt(mean_sq))
    tr_sigma = (sum_sq - total * mean_sq) / denominator
    grad_sq = mean_sq - q * tr_sigma
    b_simple = tr_sigma / grad_sq if grad_sq > 0 else math.nan
    return NoiseStats(tr_sigma, grad_sq, b_simple, math.sqrt(mean_sq))
