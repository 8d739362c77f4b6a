"""Instrumentation for the memory estimator: run a training step and record its live bytes.

The step runs the client's ``workloads.training.batch_gradient`` then ``optimizer.step()``:
forward, ``CrossEntropyLoss(reduction="sum") / n``, backward accumulated over micro-batches, one
optimizer step. It clears the gradients first in one of two ways (``set_to_none``):

- ``True``, PyTorch's default (``optimizer.zero_grad()``, ``model.zero_grad()``): the ``.grad``
  tensors are freed, and the first backward allocates them again (``AccumulateGrad`` keeps the
  incoming gradient buffer); later micro-batches add to them in place.
- ``False``, the flower-large-batch client (``batch_gradient``'s ``zero_grad(set_to_none=False)``):
  the gradients stay allocated and are zeroed in place; every backward adds into them and
  frees its incoming buffers.

**What is recorded.** One allocator-level stream of (allocation, free) events per step:

- CPU: the PyTorch profiler's memory events (``profile_memory=True``). Every allocation and
  free through c10's CPU allocator reports its size and the running total of bytes it has
  handed out while profiling (``_ExtraFields_Allocation.total_allocated``). That covers tensor
  storages *and* op-internal buffers (oneDNN scratchpads and reorders go through c10 via
  ideep's registered allocator). It does not see memory allocated before the profiler started,
  so the session starts *before* the model copy is made: parameters, buffers, gradients,
  optimizer state and the input batch are all allocated, and counted, inside it. It also does
  not see allocations made on OpenMP worker threads (the profiler state is thread-local): small
  per-thread buffers, none with one intra-op thread.
- CUDA: ``torch.cuda.memory._record_memory_history`` (alloc / free_completed of caching-
  allocator blocks, sizes rounded to 512 B as in ``max_memory_allocated``), started from
  ``torch.cuda.memory_allocated()``, so all state already on the device counts.

**Which step.** Optimizer state exists only after the first step (SGD momentum buffers, Adam
``exp_avg``/``exp_avg_sq``), and gradients exist from the first backward until the next step
clears them, so the step of record is the *second* one: it starts with gradients live in both
modes (with ``set_to_none`` it frees them at once). The ground truth warms up with a full
step at the same size. The estimator records several sizes after one cheaper warm-up (zero
gradients and one optimizer step); on the benchmark models both give identical event streams,
because the warm-up only materialises state that does not depend on the batch (with
``set_to_none`` the recorded step frees those zero gradients as it would free backward's:
both have the parameters' sizes and layouts).

References: PyTorch MemTracker / FakeTensor (pytorch/pytorch PR #124685) for the idea of an
allocator-faithful step trace; DNNMem (Gao et al., ESEC/FSE 2020) for the error sources
(workspaces, allocator rounding) that a real trace captures and a static graph does not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from estimators.memory_events import Phase, StepTrace, cpu_live_bytes, no_gc, trace_cpu, trace_cuda
from estimators.step_peak import step_peak
from workloads.training import batch_gradient

__all__ = ["StepTrace", "cpu_live_bytes", "measure_peak_bytes", "no_gc", "trace_steps"]

OPTIMIZERS = ("sgd", "adam", "none")  # "none": gradients only, the server takes the step
MakeInput = Callable[[int], torch.Tensor]  # batch size -> model input of that many examples
Transform = Callable[[torch.Tensor], torch.Tensor]  # stored (micro-)batch -> model input, inside the step


def check_optimizer(optimizer: str) -> str:
    """Return the canonical optimizer name or raise ``ValueError`` naming what is allowed."""
    name = str(optimizer).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; allowed: {', '.join(OPTIMIZERS)}")
    return name


def check_positive(name: str, value: int) -> int:
    """Return ``value`` as int if it is a positive integer, else raise ``ValueError``."""
    if isinstance(value, bool) or int(value) != value or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed; it must be an integer >= 1")
    return int(value)


class GradientsOnly:
    """The ``"none"`` optimizer: a step that allocates and changes nothing.

    flower-large-batch clients only compute gradients; the server applies the global step,
    so a client holds parameters and gradients but no optimizer state.
    """

    def step(self) -> None:
        """Do nothing."""


def make_optimizer(params, optimizer: str) -> torch.optim.Optimizer | GradientsOnly:
    """SGD(momentum=0.9, weight_decay=5e-4), default Adam, or :class:`GradientsOnly`."""
    name = check_optimizer(optimizer)
    if name == "none":
        return GradientsOnly()
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    return torch.optim.Adam(params, lr=1e-3)


def default_make_input(input_shape: tuple[int, ...], input_dtype: torch.dtype) -> MakeInput:
    """Inputs of shape ``(b, *input_shape)``: standard normal floats, or zeros for integer dtypes.

    Token ids of 0 are valid for every vocabulary, and allocation sizes do not depend on the
    values, so zeros stand in for real token ids.
    """
    shape = tuple(int(d) for d in input_shape)
    if input_dtype.is_floating_point:
        return lambda b: torch.randn((b, *shape), dtype=input_dtype)
    return lambda b: torch.zeros((b, *shape), dtype=input_dtype)


def training_step(
    model: nn.Module, opt: torch.optim.Optimizer | GradientsOnly, x: torch.Tensor, y: torch.Tensor,
    micro_batch: int = 0, transform: Transform | None = None, set_to_none: bool = True,
) -> None:
    """One step: clear gradients, ``batch_gradient`` (micro-batches are views of ``x``), ``opt.step()``.

    ``set_to_none=True`` frees the gradients first (PyTorch's ``optimizer.zero_grad()``), and
    ``batch_gradient``'s own ``zero_grad(set_to_none=False)`` then finds none to zero; False is
    the client step as it is.
    """
    clear_gradients(model, set_to_none)
    batch_gradient(model, nn.CrossEntropyLoss(reduction="sum"), transform or _identity, x, y, micro_batch)
    opt.step()


def clear_gradients(model: nn.Module, set_to_none: bool) -> None:
    """Free every ``.grad`` (``set_to_none``), else nothing: ``batch_gradient`` zeroes them in place."""
    if set_to_none:
        model.zero_grad(set_to_none=True)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _batch(make_input: MakeInput, num_classes: int, b: int, device: torch.device, transform: Transform | None):
    """Input and int64 labels of ``b`` examples: on ``device``, or as stored (CPU) when a ``transform`` moves them."""
    where = device if transform is None else torch.device("cpu")
    x = make_input(b).to(where)
    return x, torch.arange(b, device=where) % num_classes


def _input_bytes(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> int:
    """Bytes of the resident batch on ``device`` (0 when it stays on the host of a CUDA step)."""
    return x.untyped_storage().nbytes() + y.untyped_storage().nbytes() if x.device == device else 0


def _run_steps(
    model: nn.Module, optimizer: str, make_input: MakeInput, num_classes: int, batch_sizes: Sequence[int],
    micro_batch: int, device: torch.device, optimizer_once: bool, warmup: str, phase: Phase,
    transform: Transform | None = None, set_to_none: bool = True,
) -> list[int]:
    """Copy the model, warm it up, then record one step per size.

    ``warmup="step"`` runs a full step at ``batch_sizes[0]``; ``"state"`` only zero gradients and
    an optimizer step, which materialise the same gradients and optimizer state without a
    forward/backward pass (the estimator's choice: one pass fewer on large models).

    Each recorded step runs zero_grad/forward/backward inside ``phase(i, "fb")`` and
    ``optimizer.step()`` inside ``phase(i, "opt")`` (only for i = 0 if ``optimizer_once``: the
    optimizer's allocations do not depend on the batch). Returns the input bytes per step.
    """
    clone = copy.deepcopy(model).to(device)
    clone.train()
    opt = make_optimizer(clone.parameters(), optimizer)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    input_bytes = []
    x = y = None
    for i, b in enumerate(batch_sizes):
        del x, y  # free the previous batch before the next is made: one batch is resident
        x, y = _batch(make_input, num_classes, b, device, transform)
        input_bytes.append(_input_bytes(x, y, device))
        if i == 0 and warmup == "step":  # gradients (live until the next step clears them), optimizer state
            training_step(clone, opt, x, y, micro_batch, transform, set_to_none)
        elif i == 0:
            for p in clone.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            opt.step()
        with phase(i, "fb"):
            clear_gradients(clone, set_to_none)
            batch_gradient(clone, loss_fn, transform or _identity, x, y, micro_batch)
        if i == 0 or not optimizer_once:
            with phase(i, "opt"):
                opt.step()
    return input_bytes


def trace_steps(
    model: nn.Module,
    optimizer: str,
    make_input: MakeInput,
    num_classes: int,
    batch_sizes: Sequence[int],
    micro_batch: int = 0,
    device: str | torch.device = "cpu",
    optimizer_once: bool = False,
    warmup: str = "step",
    transform: Transform | None = None,
    set_to_none: bool = True,
) -> list[StepTrace]:
    """Record the live bytes of training steps of a copy of ``model``, one per batch size.

    One copy is trained: a warm-up at ``batch_sizes[0]`` (``warmup="step"``: a full step;
    ``"state"``: only zero gradients and an optimizer step, the same state without a pass),
    then one recorded step per size, in micro-batches of ``micro_batch`` (0: one pass). The
    caller's model is not modified (keep it on the CPU); random draws use a forked RNG seeded
    with 0. ``make_input(b)`` makes the input of ``b`` examples, labels are int64 in
    ``[0, num_classes)``, and ``transform`` is applied to each micro-batch inside the step, as
    the clients' ``inputs`` function. ``optimizer_once``: ``optimizer.step()`` only in the first
    recorded step (its allocations do not depend on the batch). ``set_to_none``: each step frees
    the gradients first (PyTorch's default) or zeroes them in place (the clients; every
    micro-batch after the first runs that way).
    """
    optimizer = check_optimizer(optimizer)
    sizes = [check_positive("batch_size", b) for b in batch_sizes]
    device = torch.device(device)

    def run(phase: Phase) -> list[int]:
        return _run_steps(model, optimizer, make_input, num_classes, sizes, micro_batch, device, optimizer_once, warmup,
                          phase, transform, set_to_none)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), no_gc():
        torch.manual_seed(0)
        if device.type == "cuda":
            return trace_cuda(run, sizes, device, set_to_none)
        return trace_cpu(run, sizes, set_to_none)


def measure_peak_bytes(
    model: nn.Module,
    input_shape: tuple[int, ...],
    num_classes: int,
    optimizer: str,
    batch_size: int,
    device: str | torch.device = "cpu",
    micro_batch_size: int | None = None,
    input_dtype: torch.dtype = torch.float32,
    make_input: MakeInput | None = None,
    transform: Transform | None = None,
    set_to_none: bool = True,
) -> int:
    """Ground truth: peak of all live bytes during a real second training step, in bytes.

    A deep copy of ``model`` runs two steps of ``optimizer`` ("sgd", "adam", or "none":
    gradients only, as our clients) on ``batch_size`` examples, in micro-batches of
    ``micro_batch_size`` if given, with ``transform`` applied per micro-batch. ``set_to_none``:
    the steps free the gradients first (PyTorch's default) or zero them in place (our clients).
    CPU: from the profiler's allocator events (module docstring), which count the copy's
    parameters, buffers, gradients, optimizer state and the input batch. CUDA:
    ``max_memory_allocated()`` over the second step; everything on the device counts (pass a
    CPU-resident model).
    """
    make_input = make_input or default_make_input(input_shape, input_dtype)
    micro = 0 if micro_batch_size is None else check_positive("micro_batch_size", micro_batch_size)
    device = torch.device(device)
    if device.type != "cuda":
        return trace_steps(model, optimizer, make_input, num_classes, [batch_size], micro, device,
                           transform=transform, set_to_none=set_to_none)[0].peak_bytes
    if not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} is not available here; allowed: 'cpu' or a visible CUDA device")
    batch_size = check_positive("batch_size", batch_size)

    clone = copy.deepcopy(model).to(device).train()
    opt = make_optimizer(clone.parameters(), optimizer)
    with torch.random.fork_rng(devices=[device]):
        torch.manual_seed(0)
        x, y = _batch(make_input, num_classes, batch_size, device, transform)
        training_step(clone, opt, x, y, micro, transform, set_to_none)  # warm-up: gradients and optimizer state exist
        with step_peak(device) as peak:
            training_step(clone, opt, x, y, micro, transform, set_to_none)
    return peak.bytes
