"""Secure aggregation's settings, its exactness bound and its refusals, as pure functions.

SecAgg+ (Bell et al. 2020, arXiv 2006.09315; Flower's ``SecAggPlusWorkflow``) quantises each
client's weighted vector w_i x_i, w_i = q_i / T with q_i = round(b_i T / W), stochastically
onto T levels of [-C, C] and sums modulo M = 2^32; the server divides by sum_i w_i. We choose

- W (``max_weight``) = the smallest power of two >= max b_i, and T a power of two >= W, so
  q_i = b_i T / W exactly: the weights are exactly proportional to b_i;
- T (``quantization_range``) = the largest power of two with (K + 1) T <= M (K clients, each
  quantised value in [0, T]: the sum cannot wrap), at most 2^30 (Flower rounds into int32).
  K = 8 gives T = 2^28, 64 times finer than Flower's default 2^22;
- C (``clipping_range``) = ``secagg-clip-norm``, the L2 norm each client clips to, so no entry
  of x_i is ever clipped by the quantiser.

**Exactness.** Stochastic rounding adds to each client's w_i x_ij an independent error of
mean 0 and |e| < 2C / T (variance <= (C / T)^2). The mean's coordinate error is
sum_i e_ij / sum_i w_i with sum_i w_i = B / W, so over d coordinates

    E |G_secure - G| <= sqrt(d K) C W / (T B)        (``quantisation_bound``; worst case 2 sqrt(d) K C W / (T B)).

Digits MLP (d = 26,122), K = 8, B = 256, W = 32, T = 2^28, C = 100: 2.1e-5 in gradient units,
5e-5 of |G| in round 1; measured 3.8e-5 (docs/secure-aggregation.md, experiments/bench_secagg.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workloads.config import RunConfig
from workloads.errors import ConfigError

MODULUS = 2**32  # SecAgg+'s M: Flower requires M <= 2^32 (its masks are int64 sums of values below M)
MAX_LEVELS = 2**30  # Flower's stochastic rounding casts to int32
SECURE_TEACHERS = ("none", "step", "linear", "sqrt", "lars", "adascale", "signed-noise", "learned")
# Refused: "noise" (draws a sign per client gradient), "post-local"/"swap" (each client's velocity).


@dataclass(frozen=True)
class SecAggParams:
    """One round's SecAgg+ settings (module docstring)."""

    num_shares: int  # every sampled client shares with every other (K): SecAgg+ over the complete graph
    threshold: int  # t: shares that reconstruct a secret; a round needs t survivors
    clipping_range: float  # C
    quantization_range: int  # T, levels of [-C, C]
    modulus_range: int  # M = 2^32
    max_weight: float  # W, a power of two >= max b_i


def threshold_for(cfg: RunConfig, k: int) -> int:
    """t for a round of ``k`` clients: ``secagg-threshold``, or floor(k / 2) + 1 when it is 0."""
    return cfg.secagg_threshold or k // 2 + 1


def secagg_params(cfg: RunConfig, batches: list[int]) -> SecAggParams:
    """The settings of a round whose clients have local batches ``batches`` (b_i)."""
    k = len(batches)
    weight = 2 ** math.ceil(math.log2(max(max(batches), 1)))
    levels = min(MAX_LEVELS, 2 ** math.floor(math.log2(MODULUS / (k + 1))))
    if levels < weight:
        raise ConfigError(f"run-config key 'clients-per-round': {k} clients of up to {max(batches)} examples exceed "
                          f"what SecAgg+'s modulus 2^32 can sum exactly (T = {levels} levels < W = {weight}).")
    return SecAggParams(k, threshold_for(cfg, k), float(cfg.secagg_clip_norm), levels, MODULUS, float(weight))


def quantisation_bound(params: SecAggParams, dim: int, total: int) -> float:
    """sqrt(d K) C W / (T B): the expected L2 error of the secure mean over ``dim`` coordinates, gradient units."""
    k = params.num_shares
    return math.sqrt(dim * k) * params.clipping_range * params.max_weight / (params.quantization_range * total)


def check_secure(cfg: RunConfig, clients: int, buffers: int) -> None:
    """Refuse a secure run that cannot work (raises ``ConfigError`` naming key, value and what is allowed).

    ``clients``: the round's K (``clients-per-round``, or the node count when it is 0);
    ``buffers``: the model's non-trainable tensors (BatchNorm statistics are not summed securely).
    """
    if not cfg.secure_aggregation:
        return
    key = "run-config key 'secure-aggregation' = true"
    if cfg.aggregator != "mean":
        raise ConfigError(f"{key} with aggregator = {cfg.aggregator!r}: a robust aggregator needs each client's "
                          "gradient, which secure aggregation hides. Allowed: aggregator = 'mean'.")
    if cfg.teacher not in SECURE_TEACHERS:
        raise ConfigError(f"{key} with teacher = {cfg.teacher!r}: this teacher reads per-client gradients or "
                          f"velocities. Allowed: {', '.join(SECURE_TEACHERS)}.")
    if cfg.virtual_clients:
        raise ConfigError(f"{key} with virtual-clients = {cfg.virtual_clients}: SecAgg+ keeps its keys per Flower "
                          "node, one client each. Allowed: virtual-clients = 0.")
    if buffers:
        raise ConfigError(f"{key} with model = {cfg.model!r}: it has {buffers} buffers (BatchNorm statistics), which "
                          "are not summed securely. Allowed: a model without buffers (digits/mnist mlp or cnn).")
    t = threshold_for(cfg, clients)
    if clients < 3 or not 2 <= t < clients:
        raise ConfigError(
            f"run-config key 'clients-per-round' = {cfg.clients_per_round} ({clients} clients a round) with "
            f"secagg-threshold = {cfg.secagg_threshold} (t = {t}): SecAgg+ needs at least 3 clients and "
            f"2 <= t < K. Allowed: clients-per-round >= {max(3, t + 1)}, or a smaller secagg-threshold.")
