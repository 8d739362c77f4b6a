"""A teacher's plan for a round (``RoundPlan``), and what it changes in the round's messages.

A teacher's ``plan(server_round, batches) -> RoundPlan`` (strategies/teachers.py) is called by
``plan_round`` (strategies/server_step.py) after sampling, before the messages go out. The
helpers here turn a plan into the clients' train config and the server's view of the replies.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from protocol.messages import LocalOptimizer

from strategies.noise_scale import NoiseStats, noise_stats, noise_stats_from_sums, sq_norm


@dataclass(frozen=True)
class RoundPlan:
    """What a teacher may set before a round is sent (``plan(server_round, batches)``; optional method).

    ``batches`` maps the round's partition ids to their local batches b_i. ``None`` keeps the
    run config's value; the defaults change nothing.

    - ``local_steps``, ``server_momentum``: the round's H and the server momentum. Phase-switching
      teachers (post-local SGD, SWAP) send H > 1 and apply the pseudo-gradient (w_0 - w_H) / lr.
    - ``lr``: the round's learning rate (default: the run's schedule at this round); with
      H > 1 it is the lr of the pseudo-gradient, so the server step w_0 - lr * mean((w_0 - w_H)/lr)
      is exactly the b_i-weighted mean of the clients' w_H when the server adds nothing to it.
    - ``local_lrs``: one learning rate per local step (length H), for a schedule that goes on
      inside a long round.
    - ``local_momentum``: the clients continue the server's optimizer on their local steps:
      SGD with the run's momentum and weight decay, starting from the server's velocity, which
      the strategy sends them; the server then adds neither momentum nor weight decay, applies
      the mean pseudo-gradient and takes the b_i-weighted mean of the clients' final velocities
      as its own. With H = 1 this is exactly the large-batch momentum step.
    - ``send_velocity`` (with ``local_momentum``): False, the clients send no velocity and the
      server rebuilds the mean one from the mean weights (``velocity_from_weights``), half the upload.
    - ``grad_scale``: a multiplier m_i per partition id that client i applies to its gradient
      before replying (``signed-noise``): the server then needs only the sum of the replies. Noise
      statistics in such a round come from sums (``noise_stats_from_sums``).
    """

    local_steps: int | None = None
    server_momentum: float | None = None
    lr: float | None = None
    local_lrs: tuple[float, ...] | None = None
    local_momentum: bool = False
    grad_scale: Mapping[int, float] | None = None
    send_velocity: bool = True

    @property
    def replies_velocity(self) -> bool:
        """Whether the round's replies carry the clients' final velocity."""
        return self.local_momentum and self.send_velocity

    def check(self, steps: int, partitions: Iterable[int]) -> None:
        """Raise ValueError when the plan contradicts itself or the round (a teacher's bug)."""
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"RoundPlan.lr = {self.lr!r}: must be > 0")
        if self.local_lrs is not None and (len(self.local_lrs) != steps or min(self.local_lrs) < 0):
            raise ValueError(f"RoundPlan.local_lrs has {len(self.local_lrs)} rates; the round has {steps} local steps")
        if self.grad_scale is not None and set(self.grad_scale) != set(partitions):
            raise ValueError(f"RoundPlan.grad_scale covers partitions {sorted(self.grad_scale)}, the round "
                             f"samples {sorted(partitions)}")


def client_config(plan: RoundPlan, partition_id: int, momentum: float, weight_decay: float) -> LocalOptimizer:
    """What a plan asks of one client's step (``LocalOptimizer()``, the plain step, by default).

    Per-step rates, the server's momentum and weight decay (the clients run the server's
    optimizer, ``local_momentum``) and this client's multiplier m_i.
    """
    return LocalOptimizer(
        lrs=None if plan.local_lrs is None else [float(x) for x in plan.local_lrs],
        momentum=momentum if plan.local_momentum else 0.0, weight_decay=weight_decay if plan.local_momentum else 0.0,
        grad_scale=float(plan.grad_scale[partition_id]) if plan.grad_scale is not None else 1.0,
        scaled=plan.grad_scale is not None, send_velocity=plan.send_velocity)


def velocity_record(plan: RoundPlan, names: Sequence[str], velocity: Sequence[torch.Tensor] | None):
    """The server's velocity as the tensors sent with a ``local_momentum`` round (None: nothing to send).

    Without a velocity yet (no momentum step so far) nothing is sent and the clients start
    theirs as ``torch.optim.SGD`` does, v = d at the first step.
    """
    if not plan.local_momentum or not velocity:
        return None
    return OrderedDict((n, v.clone()) for n, v in zip(names, velocity))


def round_stats(plan: RoundPlan, grad: Sequence[torch.Tensor], client_grads: Sequence[Sequence[torch.Tensor]],
                batches: Sequence[int], grad_sqs: Sequence[float], partitions: Sequence[int],
                client_sq: Sequence[float] | None = None) -> NoiseStats:
    """The round's noise statistics: from the client gradients, or from sums when they were scaled.

    With ``grad_scale`` the replies are m_i g_i, so the spread of the replies is not the
    gradient noise; the statistics then come from what a secure-aggregation server has: the
    aggregate, sum_i b_i |g_i|^2 (every client adds its unscaled squared norm ``grad-sq``) and
    sum_i m_i^2 b_i.

    ``client_sq``: |g_i|^2 as the server computed them from the replies, with ``grad`` their
    b-weighted mean. Then sum_i b_i |g_i - G|^2 = sum_i b_i |g_i|^2 - B |G|^2 gives the same
    statistics without another pass over every client's gradient; the spread is clamped at 0 against rounding.
    """
    if plan.grad_scale is None and client_sq is not None:
        total, mean_sq = float(sum(batches)), sq_norm(grad)
        spread_sum = sum(b * q for b, q in zip(batches, client_sq))
        return noise_stats_from_sums(max(spread_sum, total * mean_sq), total, len(batches), mean_sq)
    if plan.grad_scale is None:
        return noise_stats(grad, client_grads, batches)
    return noise_stats_from_sums(
        sum(b * q for b, q in zip(batches, grad_sqs)), sum(batches), len(batches), sq_norm(grad),
        sum(plan.grad_scale[p] ** 2 * b for p, b in zip(partitions, batches)))
