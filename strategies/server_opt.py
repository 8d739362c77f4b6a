"""The server optimizer applied to the (teacher-processed) global-batch gradient.

SGD with momentum and L2 weight decay, in the same form as ``torch.optim.SGD`` (dampening 0):

    d_t = G_t + lambda * w_t
    v_t = d_t                     (t = 1)
    v_t = mu * v_{t-1} + d_t      (t > 1)
    w_{t+1} = w_t - eta_t * v_t

and a per-round learning-rate schedule eta_t with linear warm-up (Goyal et al. 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workloads.training import sgd_step


def lr_at(server_round: int, num_rounds: int, base_lr: float, warmup_rounds: int, schedule: str) -> float:
    """Learning rate of round ``server_round`` (1-based).

    Warm-up rises linearly, ``base_lr * r / warmup_rounds`` for r <= warmup_rounds. After it,
    ``constant`` keeps ``base_lr``; ``cosine`` and ``linear`` decay from ``base_lr`` toward
    0 over the remaining rounds (the last round keeps a small positive rate).
    """
    if warmup_rounds and server_round <= warmup_rounds:
        return base_lr * server_round / warmup_rounds
    span = max(1, num_rounds - warmup_rounds)
    progress = min(1.0, (server_round - warmup_rounds - 1) / span)
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclass
class ServerSGD:
    """Momentum SGD on a list of parameter tensors, updated in place."""

    momentum: float = 0.9
    weight_decay: float = 0.0
    velocity: list[torch.Tensor] | None = field(default=None, repr=False)

    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float) -> None:
        """Apply one update ``w <- w - lr * v`` to ``params`` (in place).

        ``momentum`` may change between steps (a teacher's phase switch): the velocity starts
        (``v = d``) at the first step with a non-zero momentum, and is kept while it is 0.
        """
        self.velocity = sgd_step(params, grads, lr, self.momentum, self.weight_decay, self.velocity)
