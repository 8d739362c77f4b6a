"""The time-to-accuracy study's runs: the fleet's virtual clock and one training run per method.

Each round is computed centrally as the union batch of its clients (exactly the federated step
without BatchNorm, tests/test_equivalence.py); ``post-local``'s local rounds run every client's
H steps on its own copy of the model and average weights and velocities, as the product's
``post-local`` teacher does (strategies/local_phase.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from estimators.performance import (
    IterTimeModel, comm_seconds, fit_iter_time, profile_batches, round_seconds, split_for_equal_finish,
)
from experiments.tta_methods import (
    CLIENTS, DATASET, EPOCHS, EVAL_EPOCHS, LARGE, LOCAL_CLIENTS, MODEL, MOMENTUM, SMALL, TRAIN_LIMIT, WARMUP_FRAC,
    WEIGHT_DECAY, Method, local_phase, local_rounds, planned_steps, step_schedule,
)
from strategies.aggregation import weighted_mean
from strategies.batch_policy import noise_batch, noise_moments, noise_scale_of, scheduled_batch
from strategies.noise_scale import NoiseStats, noise_stats
from strategies.server_opt import ServerSGD, lr_at, running_mean, velocity_from_weights
from workloads.batches import split_global_batch
from workloads.data import Splits
from workloads.devices import DeviceProfile, parse_profiles
from workloads.files import atomic_write_json
from workloads.models import build_model
from workloads.registry import WORKLOADS
from workloads.training import batch_gradient, draw_batch, evaluate, local_momentum_sgd

ROUND_LATENCY_S = 11.7  # fixed seconds per round of real SuperNodes (docs/deploy.md, the local rehearsal)
FLEET = parse_profiles(",".join(16 * ["phone:0:0.25:20:60", "tablet:0:0.5:50:30", "laptop:0:1:100:20",
                                      "old-phone:0:0.15:10:80"]))
DEVICE_MAX_BATCH = 64  # per device; the fleet holds 64 x 64 = 4,096 examples a round, far above LARGE


class FleetClock:
    """Virtual seconds of a round of B examples on ``FLEET``, from one measured step-time model."""

    def __init__(self, seconds_at: dict[int, float], model_bytes: float) -> None:
        self.seconds_at = seconds_at
        self.model: IterTimeModel = fit_iter_time(list(seconds_at), list(seconds_at.values()))
        self.comm = [comm_seconds(model_bytes, p) for p in FLEET]
        self.comm_local = [comm_seconds(2 * model_bytes, p) for p in FLEET]  # weights + velocity
        self._cache: dict[int, float] = {}

    def __call__(self, batch: int) -> float:
        """max_i (t(b_i) / speed_i + link_i) over the round's devices, plus the fixed round latency, s."""
        if batch not in self._cache:
            k = min(len(FLEET), batch)
            models = [_Scaled(self.model, p) for p in FLEET[:k]]
            split = split_for_equal_finish(batch, models, self.comm[:k], [DEVICE_MAX_BATCH] * k)
            compute = [m(b) for m, b in zip(models, split)]
            self._cache[batch] = round_seconds(compute, self.comm[:k], 0.0, ROUND_LATENCY_S)
        return self._cache[batch]

    def local(self, steps: int, batch: int = LARGE, clients: int = LOCAL_CLIENTS, velocity: bool = True) -> float:
        """A local round: FLEET's first ``clients`` devices each run ``steps`` steps of
        ``batch / clients`` examples and send weights and velocity (``velocity`` False: weights
        only), plus the round latency, s."""
        compute = [steps * _Scaled(self.model, p)(batch // clients) for p in FLEET[:clients]]
        return round_seconds(compute, (self.comm_local if velocity else self.comm)[:clients], 0.0, ROUND_LATENCY_S)


@dataclass(frozen=True)
class _Scaled:
    """A device's step time: this machine's model divided by the device's speed."""

    base: IterTimeModel
    profile: DeviceProfile

    def __call__(self, b: float) -> float:
        return float(self.base(b)) / self.profile.speed

    def inverse(self, t: float) -> float:
        return float(self.base.inverse(t * self.profile.speed))


def calibrate(splits: Splits, path: Path) -> dict[int, float]:
    """Median seconds of a gradient step at ``profile_batches(DEVICE_MAX_BATCH)`` on this machine (stored)."""
    if path.exists():
        return {int(k): v for k, v in json.loads(path.read_text())["seconds_at"].items()}
    w = WORKLOADS[DATASET]
    model, loss_fn = build_model(MODEL, w.input_shape, w.num_classes, 0), w.loss()
    out = {}
    for b in profile_batches(DEVICE_MAX_BATCH):
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            batch_gradient(model, loss_fn, splits.inputs, splits.x_train[:b], splits.y_train[:b])
            times.append(time.perf_counter() - t0)
        out[b] = float(np.median(times[2:]))
    atomic_write_json(path, {"seconds_at": out, "threads": torch.get_num_threads()})
    return out


def round_gradient(model, loss_fn, splits: Splits, pos: torch.Tensor, clients: int) -> tuple[list, float, NoiseStats]:
    """The union batch's mean gradient, its mean loss and its noise statistics (nan unless ``clients`` >= 2).

    With clients >= 2 the batch is split as the server would split it, each part's mean gradient
    computed, and their b_i-weighted mean taken: the federated step's own gradient.
    """
    params = list(model.parameters())
    if clients < 2:
        loss = batch_gradient(model, loss_fn, splits.inputs, splits.x_train[pos], splits.y_train[pos])
        return [p.grad.clone() for p in params], loss, NoiseStats(math.nan, math.nan, math.nan)
    sizes, parts, losses, start = split_global_batch(len(pos), clients), [], [], 0
    for b in sizes:
        idx = pos[start:start + b]
        start += b
        losses.append(batch_gradient(model, loss_fn, splits.inputs, splits.x_train[idx], splits.y_train[idx]))
        parts.append([p.grad.clone() for p in params])
    total = float(sum(sizes))
    grad = weighted_mean(parts, sizes)
    return grad, float(np.dot(sizes, losses) / total), noise_stats(grad, parts, sizes)


def ratio_ema(previous: float | None, b_simple: float, decay: float = 0.9) -> float | None:
    """The noise rule's average before it averaged tr(Sigma) and |mu|^2 apart (batch-noise, -warm, -follow):
    the EMA of each round's B_simple; a non-finite or non-positive one is skipped."""
    if not (math.isfinite(b_simple) and b_simple > 0):
        return previous
    return b_simple if previous is None else decay * previous + (1.0 - decay) * b_simple


def local_round(model, loss_fn, splits: Splits, opt: ServerSGD, draws: list[torch.Tensor], lrs: list[float],
                clients: int = LOCAL_CLIENTS, momentum: bool = True, send_velocity: bool = True) -> float:
    """A local round (post-local's, batch-step-local's); returns the clients' mean loss.

    Each of ``clients`` clients takes its equal share of every draw of positions and runs one
    step per draw from the global weights and velocity (``local_momentum_sgd``, the product's
    client); weights and velocities are then averaged, as the product's ``post-local`` round
    (strategies/local_phase.py). ``momentum`` False: plain SGD steps on the clients, then the
    server's momentum step on the mean pseudo-gradient (w_0 - w_H) / mean(lrs) at mean(lrs), as
    the product's ``local-steps`` rounds (FedAvgM). ``send_velocity`` False (with ``momentum``): the
    server rebuilds the mean velocity from the mean weights (``velocity_from_weights``). With one
    draw each is the union batch's step (tested).
    """
    if any(len(pos) % clients for pos in draws):
        raise ValueError(f"a local round's batches {[len(p) for p in draws]} must split evenly over {clients} clients")
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    w_sum, v_sum, losses = [torch.zeros_like(t) for t in start], [torch.zeros_like(t) for t in start], []
    for k in range(clients):
        with torch.no_grad():
            for p, w0 in zip(params, start):
                p.copy_(w0)
        batches = [(splits.x_train[part], splits.y_train[part]) for part in (pos.chunk(clients)[k] for pos in draws)]
        _, loss, v = local_momentum_sgd(model, loss_fn, splits.inputs, batches, lrs[0], lrs=lrs,
                                        momentum=MOMENTUM if momentum else 0.0,
                                        weight_decay=WEIGHT_DECAY if momentum else 0.0, velocity=opt.velocity)
        losses.append(loss)
        for acc, p in zip(w_sum, params):
            acc.add_(p.detach())
        for acc, t in zip(v_sum, v or []):
            acc.add_(t)
    if momentum:
        with torch.no_grad():
            for p, acc in zip(params, w_sum):
                p.copy_(acc / clients)
        opt.velocity = ([acc / clients for acc in v_sum] if send_velocity else
                        velocity_from_weights(start, [p.detach() for p in params], opt.velocity, lrs, MOMENTUM))
    else:  # FedAvgM: the server's step from w_0 on the mean pseudo-gradient
        lr = float(np.mean(lrs))
        pseudo = [(w0 - acc / clients) / lr for w0, acc in zip(start, w_sum)]
        with torch.no_grad():
            for p, w0 in zip(params, start):
                p.copy_(w0)
        opt.step(params, pseudo, lr)
    return float(np.mean(losses))


def train(method: Method, lr: float, seed: int, splits: Splits, clock: FleetClock) -> dict:
    """One run to ``EPOCHS`` epochs; its record with the validation curve (module docstring)."""
    t0, w = time.perf_counter(), WORKLOADS[DATASET]
    model, loss_fn = build_model(MODEL, w.input_shape, w.num_classes, seed), w.loss()
    params, opt = list(model.parameters()), ServerSGD(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    n = len(splits.y_train)
    total, steps_planned = EPOCHS * n, planned_steps(method, n)
    warmup = max(1, round(WARMUP_FRAC * steps_planned))
    steps = step_schedule(n, method.steps)[0] if method.steps else []
    switch = local_phase(method, n)[0] if method.local_steps else math.inf
    plan = local_rounds(method, n) if method.local_steps and method.steps else []  # batch-step-local's (B, H)
    seen = rnd = step = epoch = cursor = 0
    virtual, ema, moments, batch, next_eval = 0.0, None, None, 0, EVAL_EPOCHS * n
    curve, batches, avg, averaged = [], [], None, 0
    average_from = method.average_from * total if method.average_from else math.inf
    while seen < total:
        rnd += 1
        if rnd > switch:  # local rounds: H steps on every client (fewer in a phase's last round), then the mean
            batch, h = plan[rnd - 1] if plan else (LARGE, min(method.local_steps, math.ceil((total - seen) / LARGE)))
            draws = []
            for _ in range(h):
                pos, epoch, cursor = draw_batch(n, batch, seed, epoch, cursor)
                draws.append(pos)
            lrs = [lr_at(step + j + 1, steps_planned, lr, warmup, method.schedule) for j in range(h)]
            loss = local_round(model, loss_fn, splits, opt, draws, lrs, method.local_clients, method.local_momentum,
                               method.send_velocity)
            step, examples = step + h, batch * h
            cost = clock.local(h, batch, method.local_clients, method.local_momentum and method.send_velocity)
        else:
            if method.batch:
                batch = method.batch
            elif method.steps:
                batch = scheduled_batch(method.steps[0], steps, rnd)
            else:
                batch = noise_batch(batch if method.ratchet else 0, ema, SMALL, LARGE)
            pos, epoch, cursor = draw_batch(n, batch, seed, epoch, cursor)
            clients = 1 if method.batch or method.steps else CLIENTS  # the noise rule measures B_simple
            grad, loss, stats = round_gradient(model, loss_fn, splits, pos, clients)
            if not (method.settle and rnd <= warmup):
                ema, moments = _observe(method, ema, moments, stats)
            step, examples, cost = step + 1, batch, clock(batch)
            opt.step(params, grad, lr_at(step, steps_planned, lr, warmup, method.schedule))
        if not math.isfinite(loss) or loss > 1e3:
            return _record(method, lr, seed, rnd, seen, virtual, curve, batches, t0, diverged=True)
        seen, virtual = seen + examples, virtual + cost
        batches.append(batch)
        if seen > average_from:
            averaged += 1
            avg = running_mean(avg, params, averaged)
        if seen >= next_eval or seen >= total:
            next_eval += EVAL_EPOCHS * n
            val, raw = _accuracy(model, loss_fn, avg, splits, "val")
            curve.append({"round": rnd, "samples_seen": seen, "virtual_total_s": virtual, "val_accuracy": val,
                          "global_batch": batch, "b_simple_ema": ema if ema is not None else math.nan,
                          **({"val_accuracy_last": raw} if avg is not None else {})})
    test, raw = _accuracy(model, loss_fn, avg, splits, "test")
    rec = _record(method, lr, seed, rnd, seen, virtual, curve, batches, t0, test=test)
    return rec | ({"final_test_accuracy_last": raw, "averaged_rounds": averaged} if avg is not None else {})


def _accuracy(model, loss_fn, avg, splits: Splits, split: str) -> tuple[float, float]:
    """Accuracy on ``split`` of the tail average ``avg`` (the model's own weights where None), and of the
    model's own weights (the last round's)."""
    x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
    raw = evaluate(model, loss_fn, splits.inputs, x, y, 500)[1]
    if avg is None:
        return raw, raw
    params = list(model.parameters())
    last = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, m in zip(params, avg):
            p.copy_(m)
    acc = evaluate(model, loss_fn, splits.inputs, x, y, 500)[1]
    with torch.no_grad():
        for p, w in zip(params, last):
            p.copy_(w)
    return acc, raw


def _observe(method: Method, ema: float | None, moments, stats: NoiseStats) -> tuple[float | None, object]:
    """The noise rule's average after one round: (E or the EMA of B_simple, the averaged moments)."""
    if method.moments:  # the product's PolicyMemory.observe: keep E while the averaged |mu|^2 <= 0
        moments = noise_moments(moments, stats.tr_sigma, stats.grad_sq, 0.9)
        scale = noise_scale_of(moments)
        return (ema if scale is None else scale), moments
    return ratio_ema(ema, stats.b_simple), moments


def _record(method: Method, lr: float, seed: int, rnd: int, seen: int, virtual: float, curve: list, batches: list,
            t0: float, test: float = 0.1, diverged: bool = False) -> dict:
    """The JSON record of one run."""
    return {"method": method.name, "lr": lr, "seed": seed, "rounds": rnd, "samples_seen": seen,
            "epochs": seen / TRAIN_LIMIT, "virtual_s": virtual, "final_test_accuracy": test,
            "final_val_accuracy": curve[-1]["val_accuracy"] if curve and not diverged else 0.1,
            "diverged": diverged, "curve": curve, "mean_batch": float(np.mean(batches)) if batches else 0.0,
            "wall_s": time.perf_counter() - t0}

