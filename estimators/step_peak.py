"""The measured peak memory of a step as a client runs it: the per-round ground truth.

Same definition as :func:`estimators.memory_trace.measure_peak_bytes`: the bytes live at the
step's start (parameters, buffers, gradients, the stored batch) plus the largest excess the
step allocates on top of them.

- CPU: the PyTorch profiler's allocator events (``profile_memory=True``) around the step give
  the running live bytes relative to its start; the resident bytes are counted from the
  tensors' storages (each storage once). The process's resident set (``ru_maxrss``) would
  count the dataset, Python, Ray and every earlier round instead.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; everything on
  the device counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from estimators.memory_events import cpu_live_bytes, cpu_memory_profile, no_gc


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


@dataclass
class PeakReading:
    """Filled in when the ``step_peak`` block exits."""

    bytes: int = 0


@contextlib.contextmanager
def step_peak(device: torch.device, resident: Iterable[torch.Tensor | None] = ()) -> Iterator[PeakReading]:
    """Measure the peak live bytes of the block's work on ``device``.

    Parameters
    ----------
    device : torch.device
        Where the step runs.
    resident : iterable of Tensor
        CPU only: the tensors live when the step starts that belong to it (model parameters,
        buffers, gradients, the batch); their storages are added to the step's excess.

    Yields
    ------
    PeakReading
        ``.bytes`` is set on exit, bytes.
    """
    reading = PeakReading()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield reading
        torch.cuda.synchronize(device)
        reading.bytes = int(torch.cuda.max_memory_allocated(device))
        return
    base = storage_bytes(resident)
    with no_gc(), cpu_memory_profile() as prof:
        yield reading
    live = cpu_live_bytes(prof)
    reading.bytes = base + max(0, int(live.max(initial=0)))
