"""Client-level differential privacy at the server: DP-FedSGD (McMahan et al. 2018, arXiv 1710.06963).

Each client clips its gradient to L2 norm C (workloads/privacy.py); the server clips again (a
no-op for an honest client) and replaces the b_i-weighted mean by the fixed-denominator
estimator with Gaussian noise:

    w_i = b_i / b_max            (b_max: the largest b_i planned this round; public; w_i <= 1)
    W   = sum of the PLANNED w_i (fixed before any reply arrives; a dropped client does not shrink it)
          = B / b_max with the even split of ``batch-policy`` fixed or step: the same for any sample
    G~  = sum_i w_i clip(g_i) / W  +  N(0, sigma^2 I),   sigma = z C / W

One client changes sum_i w_i clip(g_i) by at most C (added or removed, w_i <= 1), so G~ has
sensitivity C / W and each round is the sampled Gaussian mechanism with noise multiplier z at
sampling rate q = K / N (K clients of the round, N usable clients; q = 1 when every client takes
part). The noise goes in before the teacher and the optimizer, which only post-process G~.

Accounting is Opacus' (``RDPAccountant`` or ``PRVAccountant``): the history is one
(z, q, steps) entry per run of rounds with the same q, kept in the ``ServerState``, so a resumed
run reports the same epsilon. ``dp-target-epsilon`` chooses z with Opacus'
``get_noise_multiplier`` for ``num-server-rounds`` steps at round 1's q. The noise is drawn from
a secret seed chosen in round 1 (``dp-noise-seed = -1``) or from a given one. Opacus is imported
only when DP is on (its import takes about 5 s).
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from workloads.config import RunConfig
from workloads.errors import ConfigError
from workloads.privacy import clip_gradient

# Teachers whose output depends only on G~, the weights, the batch sizes and the round: post-processing.
DP_TEACHERS = ("none", "step", "linear", "sqrt", "lars")
DP_BATCH_POLICIES = ("fixed", "step")  # every sampled client gets B_r / K (+-1): W is the same for any sample
Step = tuple[float, float, int]  # Opacus' history entry: (noise multiplier z, sample rate q, steps)


def dp_on(cfg: RunConfig) -> bool:
    """Whether client-level DP is on (``dp-clip-norm > 0``)."""
    return cfg.dp_clip_norm > 0


def check_privacy(cfg: RunConfig) -> None:
    """Refuse settings under which the released model would depend on unclipped or un-noised client data."""
    if not dp_on(cfg):
        return
    refusals = (
        ("aggregator", cfg.aggregator, cfg.aggregator != "mean", "mean (a robust rule's sensitivity to one client "
         "is not C / W)"),
        ("teacher", cfg.teacher, cfg.teacher not in DP_TEACHERS, f"{', '.join(DP_TEACHERS)} (the others read each "
         "client's gradient, its noise statistics or its local velocity, none of them noised)"),
        ("batch-policy", cfg.batch_policy, cfg.batch_policy not in DP_BATCH_POLICIES,
         f"{', '.join(DP_BATCH_POLICIES)} (they give every sampled client B / K examples, so W does not depend on "
         "which clients were sampled; memory-max and optimal set b_i per client, noise and optimal from un-noised "
         "gradient statistics)"),
    )
    refusals += (("secure-aggregation", cfg.secure_aggregation, cfg.secure_aggregation, "false (the secure round "
                  "adds no DP noise: distributed noise behind SecAgg+ is not built yet; docs/privacy.md)"),)
    for key, value, bad, allowed in refusals:
        if bad:
            raise ConfigError(f"run-config key '{key}' = {value!r} with dp-clip-norm = {cfg.dp_clip_norm:g} "
                              f"(client-level DP). Allowed: {allowed}.")


def check_private_model(cfg: RunConfig, buffers: Sequence[str]) -> None:
    """Refuse a model with buffers (BatchNorm statistics) under DP: they are averaged without clip or noise."""
    if dp_on(cfg) and buffers:
        raise ConfigError(
            f"run-config key 'model' = {cfg.model!r} has buffers ({', '.join(list(buffers)[:3])}) that the server "
            "averages without clip or noise, so dp-clip-norm > 0 would not cover them. Allowed with DP: a model "
            "without BatchNorm (digits: mlp; mnist, cifar10: cnn).")


def fixed_weights(batches: Sequence[int], planned: Sequence[int]) -> tuple[list[float], float]:
    """(w_i, W): w_i = b_i / b_max for the valid replies' ``batches``, W = sum_j b_j / b_max over ``planned``.

    b_max is the largest planned b_j, so every w_i <= 1 and W does not depend on who replied.
    """
    b_max = float(max(planned))
    return [b / b_max for b in batches], sum(planned) / b_max


def noise_seed(cfg: RunConfig, chosen: int | None) -> int:
    """The run's noise seed: ``chosen`` once set (round 1, kept in the checkpoint), else ``dp-noise-seed``.

    ``dp-noise-seed = -1`` draws a 62-bit secret from the operating system: the noise is then
    unknown to anyone without checkpoint.pt. A seed >= 0 makes runs reproducible, and the noise
    removable by whoever knows that seed.
    """
    if chosen is not None:
        return chosen
    return cfg.dp_noise_seed if cfg.dp_noise_seed >= 0 else secrets.randbits(62)


def noise_generator(seed: int, rnd: int) -> torch.Generator:
    """The round's noise generator, from the run's noise seed and the round: a resumed run draws the same noise."""
    return torch.Generator().manual_seed((seed * 1_000_033 + rnd * 7_919 + 104_729) % 2**63)


def private_mean(grads: Sequence[Sequence[torch.Tensor]], batches: Sequence[int], planned: Sequence[int],
                 clip: float, z: float, generator: torch.Generator
                 ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], float]:
    """G~ = sum_i w_i clip(g_i) / W + N(0, (z C / W)^2) per coordinate (module docstring).

    Returns G~ (float32, new tensors), the clipped client gradients and sigma = z C / W, in gradient units.
    """
    weights, total = fixed_weights(batches, planned)
    clipped = [clip_gradient(g, clip)[0] for g in grads]
    sigma = z * clip / total
    out = [torch.zeros_like(t, dtype=torch.float32) for t in clipped[0]]
    for client, w in zip(clipped, weights):
        for acc, t in zip(out, client):
            acc.add_(t, alpha=w / total)
    if sigma > 0:
        for acc in out:
            acc.add_(torch.randn(acc.shape, generator=generator, dtype=torch.float32), alpha=sigma)
    return out, clipped, sigma


def add_step(history: Sequence[Step], z: float, q: float) -> tuple[Step, ...]:
    """The history with one more round (z, q); a round like the last one extends its entry."""
    if history and history[-1][0] == z and history[-1][1] == q:
        return (*history[:-1], (z, q, history[-1][2] + 1))
    return (*history, (z, q, 1))


def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"rdp": RDPAccountant, "prv": PRVAccountant}[name]()


def epsilon(history: Sequence[Step], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` after the rounds of ``history``, from Opacus' accountant; inf with z = 0; 0 for none."""
    if not history:
        return 0.0
    if min(z for z, _, _ in history) == 0:
        return math.inf
    acc = _accountant(accountant)
    acc.history = [tuple(step) for step in history]
    with np.errstate(divide="ignore"):  # PRV at q = 1 takes log(1 - q) = log(0) on its way to the same result
        return float(acc.get_epsilon(delta=delta))


def choose_noise_multiplier(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """The z with which ``steps`` rounds at rate ``q`` reach epsilon <= ``target`` at ``delta`` (Opacus' search)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search's trial z at its upper end: "Optimal order is the largest alpha"
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                          accountant=accountant))


def round_noise_multiplier(cfg: RunConfig, chosen: float | None, q: float) -> float:
    """The run's z: ``chosen`` once set (round 1, kept in the checkpoint), else from the config at rate ``q``."""
    if chosen is not None:
        return chosen
    if cfg.dp_target_epsilon > 0:
        return choose_noise_multiplier(cfg.dp_target_epsilon, cfg.dp_delta, q, cfg.num_server_rounds,
                                       cfg.dp_accountant)
    return cfg.dp_noise_multiplier


def privacy_summary(cfg: RunConfig, history: Sequence[Step]) -> dict[str, object]:
    """The run's privacy figures (privacy.json): the settings, Opacus' history and epsilon at ``dp-delta``."""
    eps = epsilon(history, cfg.dp_delta, cfg.dp_accountant)
    return {"dp_clip_norm": cfg.dp_clip_norm, "dp_noise_multiplier": history[-1][0] if history else None,
            "dp_delta": cfg.dp_delta, "dp_accountant": cfg.dp_accountant, "dp_target_epsilon": cfg.dp_target_epsilon,
            "rounds": sum(n for _, _, n in history), "history": [list(step) for step in history],
            "dp_epsilon": eps if math.isfinite(eps) else None}
