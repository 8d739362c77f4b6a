"""Training math shared by the ClientApp, the reference runs and the benchmarks.

The large-global-batch step (Tyagi, arXiv 2509.10537): client i computes the gradient of the
mean loss over its local batch of b_i examples,

    g_i = (1/b_i) * sum_{j in batch_i} grad l(x_j; w),

accumulated over micro-batches so that memory follows the micro-batch, not b_i. The server
forms G = sum_i b_i g_i / sum_i b_i, which is exactly the gradient of the mean loss over the
union of the local batches (B = sum_i b_i examples).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

InputFn = Callable[[torch.Tensor], torch.Tensor]  # uint8 batch -> float model input


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def draw_batch(n: int, b: int, seed: int, epoch: int, cursor: int) -> tuple[torch.Tensor, int, int]:
    """Take the next ``b`` positions of an epoch-wise shuffle of ``range(n)``.

    Every epoch visits each position exactly once; a batch that crosses an epoch boundary
    finishes the old permutation and continues with the next one.

    Parameters
    ----------
    n : int
        Partition size (examples).
    b : int
        Examples to draw; at most ``n``.
    seed : int
        Seeds the permutation of every epoch (with the epoch number).
    epoch, cursor : int
        Where the previous draw stopped (from the server's ``drawn-examples``).

    Returns
    -------
    (positions, epoch, cursor)
        Int64 positions into the partition, and the new epoch and cursor.
    """
    if not 0 < b <= n:
        raise ValueError(f"batch of {b} examples from a partition of {n}: need 0 < b <= n")
    taken: list[torch.Tensor] = []
    need = b
    while need:
        perm = _epoch_permutation(n, seed, epoch)
        take = min(need, n - cursor)
        taken.append(perm[cursor : cursor + take])
        need -= take
        cursor += take
        if cursor == n:
            epoch, cursor = epoch + 1, 0
    return torch.cat(taken), epoch, cursor


def batch_gradient(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: InputFn,
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batch: int = 0,
) -> float:
    """Put d(mean loss over the batch)/dw into ``p.grad`` and return the mean loss.

    The batch is processed in micro-batches of ``micro_batch`` examples (0 = all at once);
    each micro-batch adds ``sum of its losses / len(batch)``, so the accumulated gradient is
    the full-batch mean gradient whatever the split (up to float rounding).

    Parameters
    ----------
    loss_fn : nn.Module
        A loss with ``reduction="sum"``.
    inputs : callable
        Turns a uint8 micro-batch into the float model input (normalise, augment, move).
    x, y : torch.Tensor
        The uint8 examples and int64 labels of the batch (on the CPU).
    """
    model.zero_grad(set_to_none=False)
    n = len(y)
    step = micro_batch if micro_batch and micro_batch < n else n
    total = 0.0
    for start in range(0, n, step):
        xb = inputs(x[start : start + step])
        yb = y[start : start + step].to(xb.device, non_blocking=True)
        loss = loss_fn(model(xb), yb)
        (loss / n).backward()
        total += float(loss.detach())
    return total / n


def step_seconds(
    model: nn.Module, loss_fn: nn.Module, inputs: InputFn, x: torch.Tensor, y: torch.Tensor,
    micro_batch: int = 0, min_total_s: float = 0.3, max_reps: int = 50,
) -> float:
    """Median wall seconds of one ``batch_gradient`` step on ``(x, y)``, after a warm-up step.

    At least 3 timed steps, more until ``min_total_s`` seconds are spent (at most ``max_reps``);
    CUDA work is synchronised inside each timing.
    """
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    batch_gradient(model, loss_fn, inputs, x, y, micro_batch)
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_total_s and len(times) < max_reps):
        sync(device)
        t0 = time.perf_counter()
        batch_gradient(model, loss_fn, inputs, x, y, micro_batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(sorted(times)[len(times) // 2])


def sq_norm(tensors: Sequence[torch.Tensor]) -> float:
    """Squared L2 norm of a list of tensors, accumulated in float64."""
    return sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors)


@torch.no_grad()
def sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float, momentum: float = 0.0,
             weight_decay: float = 0.0, velocity: list[torch.Tensor] | None = None) -> list[torch.Tensor] | None:
    """One ``torch.optim.SGD`` step (dampening 0) on ``params`` in place; returns the velocity.

    d = g + weight_decay * w; v = d at the first step with momentum (no ``velocity`` yet), else
    v = momentum * v + d; w <- w - lr * v (w <- w - lr * d without momentum, the velocity kept).
    """
    fresh = bool(momentum) and not velocity
    if fresh:
        velocity = [None] * len(params)
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g.to(p.dtype)
        if weight_decay:
            d = d.add(p, alpha=weight_decay)
        if momentum:
            if fresh:
                velocity[i] = d.clone()
            else:
                velocity[i].mul_(momentum).add_(d)
            d = velocity[i]
        p.add_(d, alpha=-lr)
    return velocity


def local_momentum_sgd(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: InputFn,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    micro_batch: int = 0,
    lrs: Sequence[float] | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    velocity: Sequence[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], float, list[torch.Tensor] | None]:
    """SGD in ``torch.optim.SGD``'s form over ``batches``, continuing from ``velocity``.

    Per step j: d = g + weight_decay * w; v = momentum * v + d (v = d at the first step when no
    velocity is given); w <- w - lrs[j] * v (``lr`` when ``lrs`` is None). This is the server
    optimizer (strategies/server_opt.py) run on one client, so a round of one local step from the
    server's velocity equals the server's own momentum step on that client's gradient.

    Returns
    -------
    (pseudo_grad, mean_loss, velocity)
        ``(w_0 - w_H) / lr`` per parameter, the mean loss over the steps, and the final velocity
        (None without momentum).
    """
    params = [p for p in model.parameters()]
    start = [p.detach().clone() for p in params]
    v = [t.to(p.device, p.dtype).clone() for t, p in zip(velocity, params)] if velocity is not None and momentum else None
    losses = []
    for j, (x, y) in enumerate(batches):
        losses.append(batch_gradient(model, loss_fn, inputs, x, y, micro_batch))
        v = sgd_step(params, [p.grad for p in params], lr if lrs is None else lrs[j], momentum, weight_decay, v)
    with torch.no_grad():
        pseudo = [(w0 - p.detach()) / lr for w0, p in zip(start, params)]
    return pseudo, sum(losses) / len(losses), v


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: InputFn,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
) -> tuple[float, float]:
    """Return (mean loss, accuracy) of ``model`` in eval mode over uint8 examples ``x``."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb = inputs(x[start : start + batch_size])
        yb = y[start : start + batch_size].to(xb.device)
        logits = model(xb)
        loss_sum += float(loss_fn(logits, yb))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return loss_sum / len(y), correct / len(y)


def pick_device(name: str) -> torch.device:
    """Map the run-config key ``device`` to a torch device (``auto``: cuda if available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from workloads.errors import ConfigError

        raise ConfigError(
            "run-config key 'device' = 'cuda': no CUDA device is visible here. In simulation "
            "set --federation-config 'client-resources-num-gpus=<fraction>'. Allowed: auto, cpu, cuda."
        )
    return torch.device(name)
