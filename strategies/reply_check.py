"""Checks of client replies, run on every reply before the global model changes.

A synchronous large-batch step (Tyagi, arXiv 2509.10537) averages K client gradients into
the gradient of one global batch. It is exact only when every gradient is what the server
asked for: the model's tensors, finite, computed on the b_i examples the server assigned.
One NaN, one broadcastable wrong shape or one lie about ``num-examples`` otherwise reaches
the weights. These functions take plain tensors and numbers (no Flower types) and return
the reason a reply is invalid, or ``None``.

The norm guard (``norm_outliers``) is the one check that is statistical rather than exact:
it rejects a client whose gradient norm exceeds ``max-norm-ratio`` times the largest norm of
the round's other valid clients, which bounds what a single scaled or corrupted gradient can
do to the step, at the price of dropping an honest client that is that far out (the default
sits above the measured honest spreads, see docs/faults.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from protocol import messages as proto

# Metrics the server reads from every train reply. ``peak-mem-mb`` is NaN in rounds in which a
# CPU client does not measure its peak (``memory-check-every``).
REQUIRED_METRICS = (
    proto.NUM_EXAMPLES, proto.TRAIN_LOSS, proto.COMPUTE_S, proto.PEAK_MEM_MB, proto.PREDICTED_PEAK_MB, proto.BUDGET_MB,
    proto.MAX_BATCH, proto.MICRO_BATCH, proto.PARTITION_ID,
)
MAY_BE_NAN = frozenset({proto.PEAK_MEM_MB})


@dataclass(frozen=True)
class Expected:
    """What a valid reply of one client holds this round."""

    param_shapes: Mapping[str, tuple[int, ...]]  # parameter name -> exact shape
    buffers: Mapping[str, torch.Tensor]  # the server's buffers before the round (dtype, shape, counters)
    local_batch: int  # b_i the server assigned, examples
    local_steps: int  # H: forward passes per example at most H (micro-batches of >= 1 example)
    partition_id: int  # the partition this node identified as


def check_metrics(metrics: Mapping[str, object], exp: Expected) -> str | None:
    """Reason the reply's metrics are invalid, or None."""
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing:
        return f"metrics missing: {', '.join(missing)}"
    for key in REQUIRED_METRICS:
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric '{key}' = {value!r} is not a number"
        if not math.isfinite(value) and not (key in MAY_BE_NAN and math.isnan(value)):
            return f"metric '{key}' = {value!r} is not finite"
    if metrics[proto.NUM_EXAMPLES] != exp.local_batch:
        return f"{proto.NUM_EXAMPLES} = {metrics[proto.NUM_EXAMPLES]!r}; the server assigned {exp.local_batch}"
    if metrics[proto.PARTITION_ID] != exp.partition_id:
        return (f"{proto.PARTITION_ID} = {metrics[proto.PARTITION_ID]!r}; this node identified as partition "
                f"{exp.partition_id}")
    for key in (proto.TRAIN_LOSS, proto.COMPUTE_S):
        if metrics[key] < 0:
            return f"metric '{key}' = {metrics[key]!r} is negative"
    return None


def check_grad_sq(metrics: Mapping[str, object]) -> str | None:
    """Reason the reply's ``grad-sq`` (|g_i|^2 before its multiplier) is unusable, or None.

    Needed in rounds whose noise statistics come from sums (``RoundPlan.grad_scale``).
    """
    value = metrics.get(proto.GRAD_SQ)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return f"metric '{proto.GRAD_SQ}' = {value!r}: a finite number >= 0 is required in a round with gradient multipliers"
    return None


def check_tensors(kind: str, got: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                  sq_norms: list[float] | None = None) -> str | None:
    """Reason ``got`` is not exactly the named, shaped, finite floating tensors of ``shapes``, or None.

    Finiteness is read off each tensor's squared norm (NaN or Inf anywhere makes it non-finite),
    one pass per tensor (a float32 dot product; float64 when that overflows, for values above
    about 1e19); ``sq_norms``, if given, receives the squared norms in ``shapes`` order.
    """
    missing, extra = [k for k in shapes if k not in got], [k for k in got if k not in shapes]
    if missing:
        return f"{kind} tensors missing: {', '.join(missing)}"
    if extra:
        return f"unexpected {kind} tensors: {', '.join(extra)}"
    for name, shape in shapes.items():
        t = got[name]
        if tuple(t.shape) != tuple(shape):
            return f"{kind} '{name}' has shape {tuple(t.shape)}; expected {tuple(shape)}"
        if not t.is_floating_point():
            return f"{kind} '{name}' has dtype {t.dtype}; a floating dtype is required"
        flat = t.reshape(-1)
        sq = float(torch.dot(flat, flat))
        if not math.isfinite(sq):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return f"{kind} '{name}' has {bad} non-finite values (NaN or Inf)"
            sq = float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
        if sq_norms is not None:
            sq_norms.append(sq)
    return None


def check_buffers(got: Mapping[str, torch.Tensor] | None, exp: Expected) -> str | None:
    """Reason the reply's buffers (BatchNorm statistics) are invalid, or None.

    Every buffer must have the server's name, shape and dtype. Floating buffers must be
    finite. Integer buffers are counters (``num_batches_tracked``): a client adds at most one
    per forward pass, so its value lies in ``[server, server + H * b_i]``.
    """
    if not exp.buffers:
        return None
    if got is None:
        return "buffers missing"
    missing, extra = [k for k in exp.buffers if k not in got], [k for k in got if k not in exp.buffers]
    if missing:
        return f"buffer tensors missing: {', '.join(missing)}"
    if extra:
        return f"unexpected buffer tensors: {', '.join(extra)}"
    for name, ref in exp.buffers.items():
        value = got[name]
        if tuple(value.shape) != tuple(ref.shape) or value.dtype != ref.dtype:
            return (f"buffer '{name}' has shape {tuple(value.shape)} and dtype {value.dtype}; "
                    f"expected {tuple(ref.shape)} and {ref.dtype}")
        if ref.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                return f"buffer '{name}' has {bad} non-finite values (NaN or Inf)"
            continue
        low, high = ref.long(), ref.long() + exp.local_steps * exp.local_batch
        if bool((value.long() < low).any() or (value.long() > high).any()):
            return (f"buffer '{name}' = {value.flatten()[:3].tolist()}; expected between "
                    f"{int(low.flatten()[0])} and {int(high.flatten()[0])}")
    return None


NORM_WINDOW = 10  # rounds of accepted norms the guard remembers


def norm_outliers(norms: Sequence[float], max_ratio: float, recent_max: float = 0.0) -> list[bool]:
    """Flag a client whose gradient norm exceeds ``max_ratio`` times a reference of honest norms.

    The reference is the larger of the largest norm of the round's other clients and
    ``recent_max``, the largest norm accepted in the last ``NORM_WINDOW`` rounds. Not the
    median: with non-IID partitions, or local batches of a few examples, late in training most
    clients have fit their examples and their gradients nearly vanish, while a client with a
    hard example keeps a normal gradient; it measured up to 125x the round's median and 61x
    the next-largest norm (digits, b_i = 4), but stays within a few times the norms of recent
    rounds. The guard catches one gross outlier per round (a scaled, corrupted or exploding
    gradient); several colluding clients need a Byzantine-robust rule, which this is not.

    Parameters
    ----------
    norms : sequence of float
        |g_i| of the round's otherwise valid clients.
    max_ratio : float
        R; 0 turns the guard off.
    recent_max : float
        The largest accepted |g_i| of the last rounds (0 in round 1).

    Returns
    -------
    list[bool]
        True for a rejected client (at most one). With fewer than 3 clients there is no
        telling which of two is wrong, so nothing is flagged.
    """
    if max_ratio <= 0 or len(norms) < 3:
        return [False] * len(norms)
    order = sorted(range(len(norms)), key=lambda i: norms[i], reverse=True)
    top, reference = norms[order[0]], max(norms[order[1]], recent_max)
    return [i == order[0] and top > max_ratio * reference for i in range(len(norms))]
