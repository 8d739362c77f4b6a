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


def velocity_from_weights(start: Sequence[torch.Tensor], mean: Sequence[torch.Tensor],
                          velocity: Sequence[torch.Tensor] | None, lrs: Sequence[float],
                          momentum: float) -> list[torch.Tensor]:
    """The clients' mean final velocity of a local-momentum round, from their mean weights alone.

    Every client ran v_k = mu v_{k-1} + d_k, w_k = w_{k-1} - lr_k v_k (k = 1..H) from the server's
    (w_0, v_0); v_0 = 0 when ``velocity`` is None. If each client's d_k (gradient plus weight decay)
    is the same at its H steps, v_k = mu^k v_0 + c_k d with c_k = 1 + mu + ... + mu^(k-1), so
    D = w_0 - mean(w_H) = A v_0 + C d with A = sum_k lr_k mu^k and C = sum_k lr_k c_k, and the mean
    final velocity is mu^H v_0 + c_H (D - A v_0) / C. Exact for H = 1 and for a constant d; the
    clients then need not send their velocity, which halves a local round's upload.
    """
    h, mu = len(lrs), float(momentum)
    c = [sum(mu ** j for j in range(k)) for k in range(1, h + 1)]
    a = math.fsum(lr * mu ** k for k, lr in enumerate(lrs, start=1))
    cc = math.fsum(lr * ck for lr, ck in zip(lrs, c))
    if not cc > 0:
        raise ValueError(f"velocity_from_weights needs a positive learning rate among the round's steps, got {list(lrs)}")
    v0 = [torch.zeros_like(w) for w in start] if velocity is None else velocity
    out = []
    for w0, wm, v in zip(start, mean, v0):
        d = ((w0 - wm) - a * v) / cc
        out.append(mu ** h * v + c[-1] * d)
    return out


def running_mean(mean: Sequence[torch.Tensor] | None, weights: Sequence[torch.Tensor],
                 count: int) -> list[torch.Tensor]:
    """Tail average of the global weights (SWA, Izmailov et al. 2018): m_k = m_{k-1} + (w_k - m_{k-1}) / k.

    ``count`` is k, the number of models averaged including ``weights`` (k = 1 returns a copy).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if mean is None or count == 1:
        return [w.detach().clone() for w in weights]
    return [m + (w.detach() - m) / count for m, w in zip(mean, weights)]
