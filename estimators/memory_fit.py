"""The fitted memory model of a training step: per-event live bytes, piecewise affine in the batch.

``fit_step_model`` turns allocator traces at a ladder of batch sizes (estimators/memory_trace.py)
into a :class:`StepMemoryModel`; ``MemoryEstimator`` (estimators/memory.py, whose docstring
states the model and its two gradient modes) queries it.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import numpy as np

from estimators.memory_events import StepTrace

__all__ = ["StepMemoryModel", "fit_piece", "fit_step_model", "piece_max", "with_optimizer"]


@dataclass(frozen=True)
class StepMemoryModel:
    """Live bytes of a training step, piecewise affine in the (micro-)batch size.

    Attributes
    ----------
    state_bytes : float
        Live bytes at step start that do not scale with b: parameters, buffers, gradients,
        optimizer state, bytes.
    input_bytes_per_example : float
        Live bytes at step start per example of the batch (input and label), bytes/example.
    knots : tuple of int
        The traced batch sizes, ascending; piece i spans ``knots[i] .. knots[i+1]``.
    fixed, slope : tuple of np.ndarray
        Per piece and per event t, live bytes above the step start are
        ``fixed[i][t] + slope[i][t] * m`` for a micro-batch of m examples; bytes, bytes/example.
    same_ops : tuple of bool
        Per piece, whether both ends ran the same op sequence. If not, a kernel switches
        between them and the piece only bounds the regime of its upper end.
    set_to_none : bool
        How the step clears gradients: freed by ``zero_grad(set_to_none=True)`` (PyTorch's
        default) or kept and zeroed in place (False, the clients).
    later_fixed, later_slope, later_same_ops : tuple
        As ``fixed``, ``slope``, ``same_ops``, for every micro-batch after the first of an
        accumulated step, which runs with the gradients allocated, as a ``set_to_none=False``
        step's forward/backward. Empty: not fitted; with ``set_to_none=False`` such passes run
        as the first, with True a micro-batched step cannot be predicted.
    """

    state_bytes: float
    input_bytes_per_example: float
    knots: tuple[int, ...]
    fixed: tuple[np.ndarray, ...]
    slope: tuple[np.ndarray, ...]
    same_ops: tuple[bool, ...]
    set_to_none: bool = False
    later_fixed: tuple[np.ndarray, ...] = ()
    later_slope: tuple[np.ndarray, ...] = ()
    later_same_ops: tuple[bool, ...] = ()

    def transient_bytes(self, micro_batch: int, later: bool = False) -> float:
        """Largest live bytes above the step start for one (micro-)batch of ``micro_batch``, bytes.

        ``later``: a micro-batch after the first of an accumulated step (gradients allocated).

        Raises
        ------
        ValueError
            For ``later`` with ``set_to_none`` when the later passes were not fitted.
        """
        if later and self.later_same_ops:
            return piece_max(self.knots, self.later_fixed, self.later_slope, self.later_same_ops, micro_batch)
        if later and self.set_to_none:
            raise ValueError("later=True is not allowed for this set_to_none fit: its later passes were not fitted; "
                             "allowed: a fit_step_model(traces, later=...) with traces of set_to_none=False steps")
        return piece_max(self.knots, self.fixed, self.slope, self.same_ops, micro_batch)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The model as plain arrays (for the on-disk cache, workloads/cache.py)."""
        out = {"scalars": np.asarray([self.state_bytes, self.input_bytes_per_example, float(self.set_to_none)]),
               "knots": np.asarray(self.knots, dtype=np.int64), "same_ops": np.asarray(self.same_ops, dtype=bool),
               "later_same_ops": np.asarray(self.later_same_ops, dtype=bool)}
        for i, (f, s) in enumerate(zip(self.fixed, self.slope)):
            out[f"fixed_{i}"], out[f"slope_{i}"] = f, s
        for i, (f, s) in enumerate(zip(self.later_fixed, self.later_slope)):
            out[f"later_fixed_{i}"], out[f"later_slope_{i}"] = f, s
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> StepMemoryModel:
        """Inverse of ``to_arrays``."""
        n, n_later = len(a["same_ops"]), len(a.get("later_same_ops", ()))
        return cls(float(a["scalars"][0]), float(a["scalars"][1]), tuple(int(k) for k in a["knots"]),
                   tuple(np.asarray(a[f"fixed_{i}"]) for i in range(n)), tuple(np.asarray(a[f"slope_{i}"]) for i in range(n)),
                   tuple(bool(b) for b in a["same_ops"]), len(a["scalars"]) > 2 and bool(a["scalars"][2]),
                   tuple(np.asarray(a[f"later_fixed_{i}"]) for i in range(n_later)),
                   tuple(np.asarray(a[f"later_slope_{i}"]) for i in range(n_later)),
                   tuple(bool(b) for b in a.get("later_same_ops", ())))

    def peak_bytes(self, batch_size: int, micro_batch: int) -> float:
        """Peak live bytes of a step over ``batch_size`` examples in micro-batches, bytes.

        The first pass runs ``transient_bytes(m)``; the middle ones and the last (``r``
        examples) run with the gradients allocated (``later=True``).
        """
        m = min(micro_batch, batch_size)
        passes = math.ceil(batch_size / m)
        transient = self.transient_bytes(m)
        if passes > 1:
            last = batch_size - (passes - 1) * m
            transient = max(transient, self.transient_bytes(last, later=True))
        if passes > 2:
            transient = max(transient, self.transient_bytes(m, later=True))
        return self.state_bytes + self.input_bytes_per_example * batch_size + transient


def piece_max(knots: tuple[int, ...], fixed: tuple[np.ndarray, ...], slope: tuple[np.ndarray, ...],
              same_ops: tuple[bool, ...], m: int) -> float:
    """Largest ``max(0, fixed[i] + slope[i] * m)`` over the pieces whose regime may hold at ``m``, bytes.

    That is m's own piece, plus the nearest clean pieces below and above if it straddles a
    kernel switch (see the module docstring).
    """
    i = int(np.clip(np.searchsorted(knots, m, side="right") - 1, 0, len(same_ops) - 1))
    pieces = [i]
    if not same_ops[i]:
        pieces += [j for j in range(i) if same_ops[j]][-1:] + [j for j in range(i + 1, len(same_ops)) if same_ops[j]][:1]
    return max(0.0, max(float((fixed[j] + slope[j] * m).max(initial=0.0)) for j in pieces))


def _align(lo: StepTrace, hi: StepTrace) -> np.ndarray:
    """For each event of ``hi``, the index of its matching event in ``lo`` (-1 if none)."""
    if lo.keys == hi.keys:  # the usual case: the same op sequence at both sizes
        return np.arange(len(hi.keys))
    match = np.full(len(hi.keys), -1, dtype=np.int64)
    matcher = difflib.SequenceMatcher(a=lo.keys, b=hi.keys, autojunk=False)
    for block in matcher.get_matching_blocks():
        match[block.b : block.b + block.size] = np.arange(block.a, block.a + block.size)
    return match


def fit_piece(lo: StepTrace, hi: StepTrace) -> tuple[np.ndarray, np.ndarray]:
    """Per-event (fixed bytes, bytes/example) through traces at ``lo.batch_size < hi.batch_size``.

    Exact at both sizes for events matched by (op, sign); an event seen only at the upper size
    keeps its bytes there and the slope of the last matched event before it.
    """
    span = float(hi.batch_size - lo.batch_size)
    match = _align(lo, hi)
    d_hi = hi.deltas.astype(np.float64)
    matched = match >= 0
    slope = np.zeros_like(d_hi)
    slope[matched] = (d_hi[matched] - lo.deltas[match[matched]]) / span
    last = np.maximum.accumulate(np.where(matched, np.arange(len(match)), -1))
    slope[~matched] = np.where(last[~matched] >= 0, slope[np.maximum(last[~matched], 0)], 0.0)
    return d_hi - slope * hi.batch_size, slope


def with_optimizer(trace: StepTrace, ref: StepTrace) -> StepTrace:
    """``trace`` (forward/backward only) followed by the optimizer events of ``ref``.

    The optimizer's allocations do not depend on the batch; they start from whatever the
    forward/backward left live (0 bytes above the step start once the graph is freed).
    """
    if trace.has_optimizer:
        return trace
    left = int(trace.deltas[-1]) if len(trace.deltas) else 0
    ref_left = int(ref.deltas[ref.optimizer_start - 1]) if ref.optimizer_start else 0
    opt = ref.deltas[ref.optimizer_start :] - ref_left + left
    return StepTrace(
        batch_size=trace.batch_size, live_before=trace.live_before, input_bytes=trace.input_bytes,
        deltas=np.concatenate([trace.deltas, opt]), keys=trace.keys + ref.keys[ref.optimizer_start :],
        optimizer_start=len(trace.deltas),
    )


def fit_step_model(traces: list[StepTrace], later: list[StepTrace] | None = None) -> StepMemoryModel:
    """Fit :class:`StepMemoryModel` to traces at two or more ascending batch sizes.

    Parameters
    ----------
    traces : list of StepTrace
        From :func:`estimators.memory_trace.trace_steps`; the first has the optimizer events.
    later : list of StepTrace, optional
        Only for ``set_to_none`` traces: traces of ``set_to_none=False`` steps at the same
        sizes. Every micro-batch after the first runs as their forward/backward does (the
        gradients are allocated by then); without them the fit predicts single-pass steps only.

    Returns
    -------
    StepMemoryModel
    """
    sizes = [t.batch_size for t in traces]
    if len(traces) < 2 or any(a >= b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"trace batch sizes {sizes} are not allowed; need two or more, strictly ascending")
    set_to_none = traces[0].set_to_none
    if any(t.set_to_none != set_to_none for t in traces):
        raise ValueError("traces with mixed set_to_none are not allowed; allowed: traces of one mode")
    if later is not None and (not set_to_none or [t.batch_size for t in later] != sizes or any(t.set_to_none for t in later)):
        raise ValueError(f"later={[(t.batch_size, t.set_to_none) for t in later]} is not allowed; allowed: with "
                         f"set_to_none traces, set_to_none=False traces at the same sizes {sizes}")
    first = _fit_pieces([with_optimizer(t, traces[0]) for t in traces])
    rest = _fit_pieces([with_optimizer(t, later[0]) for t in later]) if later else ((), (), ())
    return StepMemoryModel(
        state_bytes=float(max(t.live_before - t.input_bytes for t in traces)),
        input_bytes_per_example=float(max(t.input_bytes / t.batch_size for t in traces)),
        knots=tuple(sizes),
        fixed=first[0], slope=first[1], same_ops=first[2],
        set_to_none=set_to_none,
        later_fixed=rest[0], later_slope=rest[1], later_same_ops=rest[2],
    )


def _fit_pieces(full: list[StepTrace]) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], tuple[bool, ...]]:
    """(fixed, slope, same_ops) of the pieces between adjacent traces (with optimizer events)."""
    pieces = [fit_piece(lo, hi) for lo, hi in zip(full, full[1:])]
    return (tuple(f for f, _ in pieces), tuple(sl for _, sl in pieces),
            tuple(lo.keys == hi.keys for lo, hi in zip(full, full[1:])))
