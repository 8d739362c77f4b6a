"""Memory estimator: the peak bytes of one client training step, and the largest batch that fits.

Each federated client picks its local batch ``b_i`` (and micro-batch) from this estimate
instead of probing for out-of-memory errors (PyTorch Lightning's ``BatchSizeFinder`` doubles
the batch until it crashes, then binary-searches).

**Two gradient modes** (``set_to_none``). How a step clears the previous step's gradients
decides where they are live:

- ``set_to_none=True``, the default: PyTorch's own loop (``optimizer.zero_grad()`` and
  ``model.zero_grad()`` default to it). The ``.grad`` tensors are freed at the step start, the
  forward pass runs without them, and backward allocates them again (``AccumulateGrad`` keeps
  each incoming gradient buffer as ``.grad``).
- ``set_to_none=False``: the step of the flower-large-batch clients
  (``workloads.training.batch_gradient`` calls ``zero_grad(set_to_none=False)``;
  ``estimators.client_step.step_estimator`` passes ``set_to_none=False``). Gradients stay allocated
  through the whole step and are zeroed in place; each backward adds into them and frees its
  incoming buffers, so forward and backward run one gradient copy higher.

Gradients are live at the start of either step (left by the previous one) and again from
backward on, so ``state`` counts them in both. With micro-batches only the first pass
differs: every later pass finds the gradients allocated, in both modes. On
experiments/bench_memory.py (CPU, 170 cases per mode) freeing the gradients lowers the measured
peak by 5.0% (median; up to 21%), so an estimate of the clients' step is 5.5% high for
PyTorch's loop (median; p95 15.7%, max 26.7%); each mode's own estimate has a median error of
0 and p95 0.17% (True) / 0.21% (False).

**Model.** Record the allocator's live bytes after every allocation and free of a real
training step (``estimators/memory_trace.py``, in the chosen mode, once gradients and optimizer
state exist, as in its second step) at a ladder of small batch sizes (3, 6, 12, 24).
Within one op sequence every tensor's size is affine in the batch (activations, their
gradients and the input scale with b; parameters, gradients and optimizer state do not), so
the live bytes after event t are affine too. With ``m`` the micro-batch (``m = b`` without
micro-batching), ``k = ceil(b / m)`` passes and ``r`` the size of the last micro-batch::

    base(b)     = state + input * b                      (live when the step starts)
    live_t(m)   = fixed_t + slope_t * m                  (minus base, after event t of the first pass)
    later_t(m)  = fixed'_t + slope'_t * m                (the same, for a pass with gradients allocated)
    peak(b, m)  = base(b) + max(0, max_t live_t(m), max_t later_t(m) if k > 2,
                                max_t later_t(r) if k > 1)                 bytes

With ``set_to_none=False`` ``later_t = live_t``; with True ``later_t`` is ``live_t`` of a False
step, traced at the ladder sizes when a query first uses micro-batches (k > 1). ``state`` =
parameters + buffers + gradients + optimizer state (SGD momentum; Adam exp_avg, exp_avg_sq,
step), ``input`` = bytes of one example plus its int64 label. The input batch stays resident
for the whole step, while activations, the transient peak inside backward (gradient buffers of
each op before ``AccumulateGrad`` adds them in place, or keeps them) and the optimizer's
temporaries follow the micro-batch: micro-batches are processed one after another. The fit
(``StepMemoryModel``, ``fit_step_model``) is in estimators/memory_fit.py.

**Kernel switches.** The op sequence is not the same at every batch: PyTorch picks kernels by
shape (on the CPU, ``ConvParams::use_mkldnn`` runs 1x1 convolutions natively below batch 16
with one thread, and oneDNN with its reorder buffers above; cuDNN picks algorithms and
workspaces per shape). So the fit is piecewise, one affine piece between adjacent ladder
sizes. Events are matched across the two ends by (op, sign) with ``difflib``; an event seen
only at the upper end keeps its bytes there and its neighbour's slope. A piece whose ends ran
different op sequences straddles a switch: between its ends the prediction is the maximum of
that piece and the nearest clean pieces below and above (either regime may hold there); above
the ladder the top piece extrapolates. The optimizer step's allocations do not depend on the
batch, so it is recorded once and appended to every size.

**On a GPU** cuDNN and cuBLAS choose algorithms, and workspaces, by shape, so the ladder
is extended by doubling (``refine``, on by default for CUDA) to at least half the batch a
query asks about; each new knot is a batch already predicted to fit, so nothing runs near
the limit. Some cuDNN workspaces are opportunistic: PyTorch falls back to an algorithm with a
smaller workspace when the allocation fails, so an uncapped ``max_memory_allocated`` can lie
far above what the step needs (experiments/bench_memory.py re-runs such cases under a cap).

**Why a real trace, not a static graph.** DNNMem (Gao et al., ESEC/FSE 2020) sums
liveness-analysed graph tensors plus an allocator model; its mean error is quoted at 14-16%
(second-hand, notes/large-batch-literature.md section 3). ColossalAI's MetaInfoProp (PR #1587)
is within -9.3% .. +8.0% on the forward alone; PyTorch's MemTracker on FakeTensor (PR #124685)
publishes no error. A real trace sees op-internal workspaces (oneDNN scratchpads and reorders,
cuDNN/cuBLAS workspaces), allocator rounding and in-place reuse, which those must model. The
cost: two optimizer steps (one materialises the state from zero gradients, one is recorded)
and forward/backward passes at the ladder sizes (45 examples in all; twice that for a
micro-batched ``set_to_none`` query), never a step at a predicted size. Unlike the probe
(Lightning), nothing is run near the memory limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from estimators.memory_fit import StepMemoryModel, fit_step_model
from estimators.memory_trace import (
    MakeInput,
    StepTrace,
    Transform,
    check_optimizer,
    check_positive,
    default_make_input,
    measure_peak_bytes,
    trace_steps,
)

TRACE_BATCH_SIZES = (3, 6, 12, 24)  # examples: a doubling ladder; see MemoryEstimator

__all__ = ["MemoryEstimator", "StepMemoryModel", "fit_step_model", "measure_peak_bytes"]


class MemoryEstimator:
    """Predict the peak memory of a training step for any batch size.

    Parameters
    ----------
    model : nn.Module
        The model (kept on the CPU; a deep copy is traced, the model is not modified).
    input_shape : tuple of int
        Shape of one example without the batch dimension: ``(C, H, W)`` for images,
        ``(seq_len,)`` for token ids, ``(seq_len, features)`` for feature sequences.
    num_classes : int
        Number of classes; labels are int64 class indices.
    optimizer : {"sgd", "adam", "none"}
        ``SGD(momentum=0.9, weight_decay=5e-4)`` (one momentum buffer per parameter),
        ``Adam`` (exp_avg and exp_avg_sq per parameter), or ``"none"``: gradients only, the
        step of a flower-large-batch client (the server applies the update).
    input_dtype : torch.dtype, default float32
        dtype of the model input: a floating dtype (images, features; random normal values)
        or an integer dtype such as ``torch.long`` (token ids; zeros, valid for any vocabulary).
    make_input : callable, optional
        ``make_input(b) -> Tensor`` builds the input for ``b`` examples; overrides
        ``input_shape``/``input_dtype`` when the input is not one plain tensor of that shape.
    transform : callable, optional
        ``transform(x) -> input`` applied to each (micro-)batch inside the step, as a client
        turns its stored uint8 batch into normalised floats on its device; the batch from
        ``make_input`` then stays resident as made (on the host).
    device : str or torch.device, default "cpu"
        Where the step runs: ``"cpu"`` or a CUDA device (traced with the CUDA allocator).
    trace_batch_sizes : tuple of int, default (3, 6, 12, 24)
        The small batches that are traced (two or more; >= 2 for BatchNorm nets whose last
        map is 1x1). Estimation runs forward/backward passes only at these sizes (45 examples
        in all; again with the gradients kept once a ``set_to_none`` query uses micro-batches)
        plus two optimizer steps.
    refine : bool, optional
        Extend the ladder by doubling (48, 96, ...) up to half the batch a query asks about,
        tracing each new size once. Default: on for CUDA, off for the CPU. cuDNN and cuBLAS
        pick algorithms (and workspaces) by shape, so on a GPU a trace at 24 examples says
        little about 512; a knot at >= b/2 bounds the extrapolation to one doubling. Every
        new knot is smaller than a batch already predicted to fit the queried budget, so
        refinement never runs a step near the memory limit. The model is kept by reference
        for these later traces: do not train it in between.
    fitted : StepMemoryModel, optional
        A fit of this exact step made before (``StepMemoryModel.from_arrays`` of a cached
        ``to_arrays``): used as is, nothing is traced. Ignored with ``refine``.
    set_to_none : bool, default True
        How the step clears gradients before its forward pass. True: PyTorch's default loop
        (``optimizer.zero_grad()`` / ``model.zero_grad()`` free the ``.grad`` tensors, the first
        backward allocates them again). False: kept and zeroed in place, as the flower-large-batch
        clients do (``workloads.training.batch_gradient``; ``estimators.client_step.step_estimator``
        passes False). With True, the first query with micro-batches also traces the ladder
        with the gradients kept, as every micro-batch after the first runs.

    Notes
    -----
    Trace with the thread count the client will use (``torch.get_num_threads()``): kernel
    choice, and so memory, depends on it.

    Attributes
    ----------
    step_model : StepMemoryModel
        The fitted model (bytes).
    estimate_seconds : float
        Wall time of all tracing and fitting so far, s.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, ...],
        num_classes: int,
        optimizer: str = "sgd",
        *,
        input_dtype: torch.dtype = torch.float32,
        make_input: MakeInput | None = None,
        transform: Transform | None = None,
        device: str | torch.device = "cpu",
        trace_batch_sizes: tuple[int, ...] = TRACE_BATCH_SIZES,
        refine: bool | None = None,
        fitted: StepMemoryModel | None = None,
        set_to_none: bool = True,
    ) -> None:
        self.optimizer = check_optimizer(optimizer)
        self.set_to_none = bool(set_to_none)
        if fitted is not None and fitted.set_to_none != self.set_to_none:
            raise ValueError(f"fitted is a fit with set_to_none={fitted.set_to_none}, not allowed with "
                             f"set_to_none={self.set_to_none}; allowed: a fit of the same mode, or none")
        self.num_classes = check_positive("num_classes", num_classes)
        if not isinstance(input_dtype, torch.dtype):
            raise ValueError(f"input_dtype={input_dtype!r} is not allowed; pass a torch.dtype such as torch.float32 or torch.long")
        if make_input is None and (not input_shape or any(int(d) != d or d <= 0 for d in input_shape)):
            raise ValueError(f"input_shape={input_shape!r} is not allowed; give one example's shape, positive ints, e.g. (3, 32, 32) or (128,)")
        sizes = sorted({check_positive("trace_batch_sizes", b) for b in trace_batch_sizes})
        if len(sizes) < 2:
            raise ValueError(f"trace_batch_sizes={trace_batch_sizes!r} is not allowed; give two or more distinct sizes >= 1")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.make_input = make_input or default_make_input(self.input_shape, input_dtype)
        self.transform = transform
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} is not available here; allowed: 'cpu' or a visible CUDA device")
        self.refine = self.device.type == "cuda" if refine is None else bool(refine)
        self._model = model
        self._traces: list[StepTrace] = []
        self._later: list[StepTrace] | None = None  # set_to_none: gradients-kept steps, traced when first needed
        self.estimate_seconds = 0.0
        if fitted is not None and not self.refine:  # a fit of the same step, from the cache: no tracing
            self.step_model = fitted
        else:
            self._trace(sizes)

    def _trace(self, sizes: list[int], later: bool = False) -> None:
        """Trace ``sizes`` and refit; adds their wall time to ``estimate_seconds``.

        With ``set_to_none``, the later passes (steps with gradients kept) are traced at every
        knot that lacks one once ``later`` is asked for, and from then on with every new size.
        """
        start = time.perf_counter()

        def run(at: list[int], set_to_none: bool) -> list[StepTrace]:
            return trace_steps(self._model, self.optimizer, self.make_input, self.num_classes, at, 0, self.device,
                               optimizer_once=True, warmup="state", transform=self.transform, set_to_none=set_to_none)

        if sizes:
            self._traces = sorted(self._traces + run(sizes, self.set_to_none), key=lambda t: t.batch_size)
        if self.set_to_none and (later or self._later is not None):
            have = {t.batch_size for t in self._later or []}
            missing = [t.batch_size for t in self._traces if t.batch_size not in have]
            self._later = sorted((self._later or []) + (run(missing, False) if missing else []), key=lambda t: t.batch_size)
        self.step_model = fit_step_model(self._traces, self._later)
        self.estimate_seconds += time.perf_counter() - start

    def _with_later_passes(self) -> StepMemoryModel:
        """``step_model``, first fitting the passes after the first micro-batch if it lacks them (``set_to_none``)."""
        if self.set_to_none and not self.step_model.later_same_ops:
            # a cached fit has no traces: trace its knots again
            self._trace([] if self._traces else list(self.step_model.knots), later=True)
        return self.step_model

    def _refined(self, search: Callable[[], int]) -> int:
        """Run ``search`` (a batch size); with ``refine``, add doubling knots below it and search again."""
        found = search()
        while self.refine and found > 2 * self.step_model.knots[-1]:
            self._trace([2 * self.step_model.knots[-1]])  # < found, which is predicted to fit
            found = search()
        return found

    def refine_to(self, batch_size: int) -> None:
        """Trace doubling sizes until the largest knot is at least ``batch_size / 2`` (if ``refine``)."""
        b = check_positive("batch_size", batch_size)
        self._refined(lambda: b)

    @property
    def state_bytes(self) -> int:
        """Parameters, buffers, gradients and optimizer state, bytes."""
        return int(math.ceil(self.step_model.state_bytes))

    def peak_bytes(self, batch_size: int, micro_batch_size: int | None = None) -> int:
        """Predicted peak live bytes of a training step over ``batch_size`` examples.

        Parameters
        ----------
        batch_size : int
            Examples in the step (>= 1).
        micro_batch_size : int, optional
            Accumulate in micro-batches of this many examples (None, or >= batch_size: one pass).

        Returns
        -------
        int
            Bytes, rounded up.
        """
        b = check_positive("batch_size", batch_size)
        m = b if micro_batch_size is None else min(b, check_positive("micro_batch_size", micro_batch_size))
        model = self._with_later_passes() if m < b else self.step_model
        return int(math.ceil(model.peak_bytes(b, m)))

    def _check_budget(self, budget_bytes: int) -> int:
        if isinstance(budget_bytes, bool) or not float(budget_bytes) >= self.state_bytes:
            raise ValueError(
                f"budget_bytes={budget_bytes!r} is not allowed: the model state alone (parameters, "
                f"gradients, {self.optimizer} state) takes {self.state_bytes} bytes; allowed: >= {self.state_bytes}"
            )
        return int(budget_bytes)

    def max_batch_size(self, budget_bytes: int, micro_batch_size: int | None = None) -> int:
        """Largest batch whose predicted peak fits ``budget_bytes`` (0 if not even one example).

        With ``micro_batch_size`` the batch is accumulated in micro-batches of that size, so
        only the resident input batch grows with b.

        Raises
        ------
        ValueError
            If the budget is below the model state, which no batch size can fix.
        """
        budget = self._check_budget(budget_bytes)
        if micro_batch_size is not None:
            check_positive("micro_batch_size", micro_batch_size)
        return self._refined(lambda: self._max_batch_size(budget, micro_batch_size))

    def _max_batch_size(self, budget: int, micro_batch_size: int | None) -> int:
        fits = lambda b: self.peak_bytes(b, micro_batch_size) <= budget  # noqa: E731
        if not fits(1):
            return 0
        # Doubling then bisection on the predicted (convex, non-decreasing) peak: no real steps.
        lo, hi = 1, 2
        while fits(hi):
            lo, hi = hi, hi * 2
            if hi > 1 << 40:
                raise ValueError(f"budget_bytes={budget!r} admits more than 2**40 examples; the step does not grow with b")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def micro_batch_for(self, batch_size: int, budget_bytes: int) -> int:
        """Micro-batch size for an assigned batch ``batch_size`` under ``budget_bytes``.

        The largest micro-batch m whose step fits, then balanced: the same number of passes
        ``k = ceil(b / m)`` with micro-batches of ``ceil(b / k)`` (never more, lower peak).

        Returns
        -------
        int
            ``batch_size`` itself when the whole batch fits in one pass.

        Raises
        ------
        ValueError
            If even micro-batches of one example do not fit.
        """
        b = check_positive("batch_size", batch_size)
        budget = self._check_budget(budget_bytes)
        if self.peak_bytes(b, 1) > budget:
            raise ValueError(
                f"budget_bytes={budget_bytes!r} is too small for batch_size={b}: even micro-batches of 1 "
                f"example need {self.peak_bytes(b, 1)} bytes; allowed: budget >= that, or a smaller batch"
            )
        lo = self._refined(lambda: self._largest_micro_batch(b, budget))
        balanced = math.ceil(b / math.ceil(b / lo))
        return balanced if self.peak_bytes(b, balanced) <= budget else lo

    def _largest_micro_batch(self, b: int, budget: int) -> int:
        lo, hi = 1, b + 1  # peak(b, lo) fits, peak(b, hi) is out of range
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.peak_bytes(b, mid) <= budget else (lo, mid)
        return lo
