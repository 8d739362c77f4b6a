"""Allocator event streams of a training step: the CPU profiler's memory events and CUDA's memory history.

The recording layer under estimators/memory_trace.py (see its docstring for what is
recorded and why). ``StepTrace`` is the result: live bytes after every allocation and free
of one step.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # read at the first profiling session: no per-trace log lines
STEP_MARK = "memory_estimator::step"  # profiler ranges "<mark>:<step>:fb|opt" around recorded phases


@dataclass(frozen=True)
class StepTrace:
    """Live bytes of one recorded training step.

    Attributes
    ----------
    batch_size : int
        Examples in the step.
    live_before : int
        Bytes live when the step starts: parameters, buffers, gradients, optimizer state and
        the input batch (x and labels), bytes.
    input_bytes : int
        Bytes of the input batch (x plus int64 labels) inside ``live_before``, bytes.
    deltas : np.ndarray
        Live bytes after each allocation/free event of the step, minus ``live_before`` (int64,
        one entry per event, in time order), bytes.
    keys : tuple of str
        One label per event, to align traces taken at two batch sizes: the op that allocated
        or freed, and ``+``/``-`` (CUDA: the sign only).
    optimizer_start : int
        Index of the first event of ``optimizer.step()``; events before it are zero_grad,
        forward and backward.
    has_optimizer : bool
        False when only zero_grad, forward and backward were recorded.
    set_to_none : bool
        How the step cleared the gradients: ``zero_grad(set_to_none=True)`` (freed; backward
        allocates them again) or False (kept, zeroed in place).
    """

    batch_size: int
    live_before: int
    input_bytes: int
    deltas: np.ndarray
    keys: tuple[str, ...]
    optimizer_start: int
    has_optimizer: bool = True
    set_to_none: bool = False

    @property
    def peak_bytes(self) -> int:
        """Peak of all live bytes during the step, bytes."""
        return self.live_before + max(0, int(self.deltas.max(initial=0)))


@contextlib.contextmanager
def no_gc():
    """Keep Python's cyclic garbage collector out of a recorded step.

    The allocator's running total is process-wide: tensors of unrelated, unreachable objects
    freed by a collection inside the recording would count as the step freeing memory.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


Phase = Callable[[int, str], contextlib.AbstractContextManager]  # (step index, "fb"|"opt") -> recorder


def _cpu_events(prof) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, tuple[int, int]]]:
    """Time (ns), live bytes since the session start and key of each CPU memory event; phase ranges."""
    allocs, ranges = [], {}
    stack = list(prof.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if type(ev.extra_fields).__name__ == "_ExtraFields_Allocation":
            if ev.extra_fields.device.type == "cpu":
                allocs.append(ev)
        elif ev.name.startswith(STEP_MARK):
            ranges[ev.name] = (ev.start_time_ns, ev.end_time_ns)
    allocs.sort(key=lambda e: e.start_time_ns)
    if not allocs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), [], ranges
    times = np.array([e.start_time_ns for e in allocs], dtype=np.int64)
    # total_allocated is the allocator's running total, updated under its lock, so it is exact even
    # where timestamps tie; it may include stale bytes from earlier sessions, hence the offset.
    first = allocs[0].extra_fields
    session_base = first.total_allocated - first.alloc_size
    live = np.array([e.extra_fields.total_allocated for e in allocs], dtype=np.int64) - session_base
    # Key = op name and sign; a free directly under a phase range (a Python local going out of
    # scope) gets the phase name without the step index, so that steps compare equal.
    parents = [e.parent.name if e.parent else "" for e in allocs]
    parents = [p.split(":")[-1] if p.startswith(STEP_MARK) else p for p in parents]
    keys = [f"{p}{'+' if e.extra_fields.alloc_size > 0 else '-'}" for p, e in zip(parents, allocs)]
    return times, live, keys, ranges


def cpu_memory_profile():
    """PyTorch's profiler recording CPU allocator events: a context manager, ``kineto_results`` after exit.

    The autograd profiler under ``torch.profiler.profile``, used directly: the latter's start does
    ``hasattr(torch, "_inductor")`` to read one CUDA-graph flag, which imports inductor, dynamo,
    sympy and triton: far more resident memory in every client process.
    """
    from torch.autograd.profiler import profile

    return profile(use_cpu=True, profile_memory=True)


@functools.lru_cache(maxsize=1)
def start_profiler_here() -> None:
    """Start PyTorch's profiler once in the calling thread.

    Its backend (kineto) registers in the first thread that profiles; when a later profile runs
    in another thread it prints "External init callback must run in same thread as
    registerClient". The in-process runtime calls this from the main thread before client calls
    run in worker threads.
    """
    with cpu_memory_profile():
        pass


def cpu_live_bytes(prof) -> np.ndarray:
    """Live CPU bytes after each allocator event of a finished profiling session, minus those at its start."""
    return _cpu_events(prof)[1]


def trace_cpu(run: Callable[[Phase], list[int]], batch_sizes: Sequence[int], set_to_none: bool = False) -> list[StepTrace]:
    from torch.autograd.profiler import record_function

    with cpu_memory_profile() as prof:
        input_bytes = run(lambda i, name: record_function(f"{STEP_MARK}:{i}:{name}"))
    times, live, keys, ranges = _cpu_events(prof)
    traces = []
    for i, b in enumerate(batch_sizes):
        t0, t_fb = ranges[f"{STEP_MARK}:{i}:fb"]
        t_opt, t1 = ranges.get(f"{STEP_MARK}:{i}:opt", (t_fb, t_fb))
        before = live[times < t0]
        live_before = int(before[-1]) if len(before) else 0
        inside = (times >= t0) & (times <= t1)
        traces.append(StepTrace(
            batch_size=b, live_before=live_before, input_bytes=input_bytes[i],
            deltas=live[inside] - live_before, keys=tuple(k for k, keep in zip(keys, inside) if keep),
            optimizer_start=int(((times >= t0) & (times < t_opt)).sum()),
            has_optimizer=f"{STEP_MARK}:{i}:opt" in ranges, set_to_none=set_to_none,
        ))
    return traces


def trace_cuda(run: Callable[[Phase], list[int]], batch_sizes: Sequence[int], device: torch.device,
               set_to_none: bool = False) -> list[StepTrace]:
    from torch.cuda import memory as cuda_memory

    steps: dict[int, dict] = {}

    @contextlib.contextmanager
    def phase(i: int, name: str):
        torch.cuda.synchronize(device)
        step = steps.setdefault(i, {"live_before": torch.cuda.memory_allocated(device), "sizes": [], "split": None})
        cuda_memory._record_memory_history(enabled="all", context=None, stacks="python", device=device, clear_history=True)
        try:
            yield
        finally:
            torch.cuda.synchronize(device)
            trace = cuda_memory._snapshot(device)["device_traces"][device.index or 0]
            cuda_memory._record_memory_history(enabled=None, device=device)
            if name == "opt":
                step["split"] = len(step["sizes"])
            # allocated_bytes (what max_memory_allocated tracks) rises at "alloc" and falls when
            # the block is really released ("free_completed", after any cross-stream use ends).
            step["sizes"] += [int(e["size"]) if e["action"] == "alloc" else -int(e["size"])
                              for e in trace if e["action"] in ("alloc", "free_completed")]

    input_bytes = run(phase)
    traces = []
    for i, b in enumerate(batch_sizes):
        step = steps[i]
        sizes = np.array(step["sizes"], dtype=np.int64)
        traces.append(StepTrace(
            batch_size=b, live_before=int(step["live_before"]), input_bytes=input_bytes[i],
            deltas=np.cumsum(sizes), keys=tuple("+" if v > 0 else "-" for v in sizes),
            optimizer_start=len(sizes) if step["split"] is None else step["split"],
            has_optimizer=step["split"] is not None, set_to_none=set_to_none,
        ))
    return traces
