"""Parallel performance model: iteration time, round time, and the batch size that costs least.

Tyagi (arXiv 2509.10537) proposes a parallel performance model that finds the global batch
of least compute cost, assuming linear speed-up until memory runs out. We make it measurable.

**Iteration time of one device** (seconds, for a local batch of b examples): a monotone
model fitted to at most four profiled batch sizes (``fit_iter_time``). Per-example time is not
constant: it falls while the device is under-used (the knee at small batches) and can rise
again when activations outgrow the caches (seen on CPUs). Two shapes are fitted, a smooth knee
``alpha + (floor^p + (beta b^q)^p)^(1/p)`` (a p-norm like Pollux's overlap term) and a
piecewise power law through the points, and the one with the lower leave-one-out error is kept. Pollux (Qiao et al., OSDI'21,
``PerfParams``) and FedScale model compute as ``alpha + beta * b``, which can show neither;
``LinearTimeModel`` keeps that model for comparison.

**Communication** (seconds): ``2 * latency + model_bytes * 8 / bandwidth_up + model_bytes * 8 /
bandwidth_down`` (weights down, gradient up).

**Synchronous round**: the slowest client's compute plus communication, plus the server's
aggregation and teacher time, plus a fixed latency L per round (``round-latency-s``: Flower's
polling and a fresh client process per message on real SuperNodes, docs/deploy.md section 10):
``T_round(B) = max_i (t_i(b_i) + comm_i) + server_s + L``.

**Statistical efficiency** (McCandlish et al. 2018; Pollux): with gradient noise scale
``B_noise`` (B_simple measured per round, strategies/noise_scale.py), reaching a target takes
``S(B) = S_min * (1 + B_noise / B)`` steps, so the time to a target is proportional to
``(1 + B_noise / B) * T_round(B)`` and the compute cost to ``(1 + B_noise / B) * B``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class _StepTime:
    """Shared behaviour of the step-time models: inverse by bisection on a rising curve."""

    def __call__(self, b: float | np.ndarray) -> float | np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, seconds: float) -> float:
        """Largest (real) batch whose step takes at most ``seconds`` (0 if not even one example)."""
        if seconds < self(1.0):
            return 0.0
        lo, hi = 1.0, 2.0
        while self(hi) <= seconds and hi < 2**40:
            lo, hi = hi, hi * 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self(mid) <= seconds else (lo, mid)
        return lo


@dataclass(frozen=True)
class KneeModel(_StepTime):
    """t(b) = alpha + (floor^p + (beta * b^q)^p)^(1/p), seconds: flat, then a power law."""

    alpha: float  # fixed overhead per step, s
    floor: float  # smallest compute time of a step (under-used device), s
    beta: float  # seconds per example^q once saturated
    p: float  # knee sharpness, >= 1
    q: float = 1.0  # growth exponent once saturated (> 1 when activations outgrow caches)

    def __call__(self, b: float | np.ndarray) -> float | np.ndarray:
        """Predicted seconds per step at local batch ``b``."""
        b = np.asarray(b, dtype=float)
        out = self.alpha + (self.floor**self.p + (self.beta * b**self.q) ** self.p) ** (1.0 / self.p)
        return float(out) if out.ndim == 0 else out

    def scaled(self, speed: float) -> KneeModel:
        """The same curve on a device ``speed`` times as fast."""
        return KneeModel(self.alpha / speed, self.floor / speed, self.beta / speed, self.p, self.q)


@dataclass(frozen=True)
class PowerLawModel(_StepTime):
    """Monotone piecewise power law through profiled points (straight lines in log-log)."""

    batches: tuple[float, ...]  # profiled batch sizes, ascending, examples
    seconds: tuple[float, ...]  # their step times, made non-decreasing, s

    def __call__(self, b: float | np.ndarray) -> float | np.ndarray:
        """Predicted seconds per step at local batch ``b``; end segments extend beyond."""
        lb, lt = np.log(self.batches), np.log(self.seconds)
        x = np.log(np.maximum(np.asarray(b, dtype=float), 1e-9))
        out = np.interp(x, lb, lt)
        lo_slope = (lt[1] - lt[0]) / (lb[1] - lb[0])
        hi_slope = (lt[-1] - lt[-2]) / (lb[-1] - lb[-2])
        out = np.where(x < lb[0], lt[0] + lo_slope * (x - lb[0]), out)
        out = np.exp(np.where(x > lb[-1], lt[-1] + hi_slope * (x - lb[-1]), out))
        return float(out) if out.ndim == 0 else out

    def scaled(self, speed: float) -> PowerLawModel:
        """The same curve on a device ``speed`` times as fast."""
        return PowerLawModel(self.batches, tuple(t / speed for t in self.seconds))


IterTimeModel = KneeModel | PowerLawModel


@dataclass(frozen=True)
class LinearTimeModel:
    """t(b) = alpha + beta b: the Pollux / FedScale compute model, for comparison."""

    alpha: float
    beta: float

    def __call__(self, b: float | np.ndarray) -> float | np.ndarray:
        """Predicted seconds per step at local batch ``b``."""
        out = self.alpha + self.beta * np.asarray(b, dtype=float)
        return float(out) if out.ndim == 0 else out


def fit_linear(batches: Sequence[float], seconds: Sequence[float]) -> LinearTimeModel:
    """Least-squares fit of alpha + beta b (Pollux's accumulation-time model)."""
    b, t = np.asarray(batches, float), np.asarray(seconds, float)
    beta, alpha = np.polyfit(b, t, 1) if len(b) > 1 else (t[0] / b[0], 0.0)
    return LinearTimeModel(float(max(alpha, 0.0)), float(max(beta, 1e-12)))


# The knee has 5 parameters and is profiled at 4 batch sizes: whole families of curves pass
# through the points (the split of alpha and floor, or of beta and q, can be traded). Weak
# priors pick one member of such a family: little fixed overhead, a linear saturated part
# (q = 1, Pollux's model) and a moderate knee (p = 4). Their weight is small against the
# log-time residuals, so they only decide what the points leave open.
_KNEE_PRIOR_WEIGHT = 1e-3
_KNEE_LOWER = np.array([-30.0, -30.0, -30.0, -5.0, -10.0])
_KNEE_UPPER = np.array([5.0, 5.0, 5.0, 4.0, 10.0])


def _knee_params(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """(alpha, floor, beta, p, q) from unbounded coordinates (log, log, log, log(p-1), logit(2(q-1)))."""
    x = np.asarray(x, float)
    return (*np.exp(x[..., :3]).T, 1.0 + np.exp(x[..., 3]), 1.0 + 0.5 / (1.0 + np.exp(-x[..., 4])))


def _knee_residuals(x: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Log-time residuals at the profiled points, then the three weighted priors; rows = ``x``'s."""
    alpha, floor, beta, p, q = (v[..., None] for v in _knee_params(np.atleast_2d(x)))
    log_compute = np.logaddexp(p * np.log(floor), p * (np.log(beta) + q * np.log(b))) / p
    fit = np.log(alpha + np.exp(log_compute)) - np.log(t)
    prior = _KNEE_PRIOR_WEIGHT * np.hstack([alpha / t[0], (q - 1.0) / 0.5, np.log((p - 1.0) / 3.0)])
    return np.hstack([fit, prior])


@np.errstate(all="ignore")
def _knee_grid_start(b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Best point of a fixed grid over (alpha, p, q); floor and beta solved in closed form.

    With alpha, p and q fixed, ``(t - alpha)^p = floor^p + beta^p b^(qp)`` is linear in
    ``floor^p`` and ``beta^p``: a relative-error least squares with two unknowns per grid point.
    """
    share = np.array([1e-4, 0.01, 0.03, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9])
    pm1 = np.geomspace(0.05, 40.0, 14)
    q = np.linspace(1.0 + 1e-4, 1.5 - 1e-4, 11)
    S, PM1, Q = (g.ravel() for g in np.meshgrid(share, pm1, q, indexing="ij"))
    P = 1.0 + PM1
    tn, bn = t / t[0], b / b[-1]  # scale-free: fit t / t_0 against b / b_max
    y = np.clip(tn[None, :] - S[:, None], 1e-12, None) ** P[:, None]  # (G, n); may under/overflow: such rows are dropped
    xcol = bn[None, :] ** (Q * P)[:, None]
    w = 1.0 / y  # relative errors
    a11, a12, a22 = (w**2).sum(1), (w**2 * xcol).sum(1), (w**2 * xcol**2).sum(1)
    r1, r2 = (w**2 * y).sum(1), (w**2 * y * xcol).sum(1)
    det = np.maximum(a11 * a22 - a12**2, 1e-300)
    F = np.clip((a22 * r1 - a12 * r2) / det, 1e-300, None)
    B = np.clip((a11 * r2 - a12 * r1) / det, 1e-300, None)
    floor, beta_n = F ** (1.0 / P), B ** (1.0 / P)
    beta = beta_n * t[0] / b[-1] ** Q  # back to seconds and examples
    x = np.column_stack([np.log(S * t[0]), np.log(floor * t[0]), np.log(beta), np.log(PM1),
                         np.log(2.0 * (Q - 1.0) / (1.0 - 2.0 * (Q - 1.0)))])
    x = np.clip(x, _KNEE_LOWER, _KNEE_UPPER)
    cost = (_knee_residuals(x, b, t) ** 2).sum(1)
    cost[~(np.isfinite(cost) & np.isfinite(x).all(1))] = np.inf  # under- or overflow in the closed form
    if not np.isfinite(cost).any():
        return np.clip(np.array([np.log(0.1 * t[0]), np.log(0.9 * t[0]), np.log(t[-1] / b[-1]), np.log(3.0), -4.0]),
                       _KNEE_LOWER, _KNEE_UPPER)
    return x[int(np.argmin(cost))]


def fit_knee(batches: Sequence[float], seconds: Sequence[float]) -> KneeModel:
    """Least squares on log time for ``KneeModel``, with weak priors; deterministic.

    A fixed grid over (alpha, p, q) finds the basin (floor and beta in closed form), then
    scipy's ``least_squares`` polishes it with every option explicit (method, scaling,
    tolerances, budget), so the result depends neither on library defaults nor on the BLAS.
    """
    from scipy.optimize import least_squares

    b, t = np.asarray(batches, float), np.asarray(seconds, float)
    x0 = _knee_grid_start(b, t)
    res = least_squares(lambda x: _knee_residuals(x, b, t)[0], x0, bounds=(_KNEE_LOWER, _KNEE_UPPER),
                        method="trf", jac="2-point", x_scale=1.0, loss="linear", tr_solver="exact",
                        ftol=1e-10, xtol=1e-10, gtol=1e-10, max_nfev=400)
    x = res.x if res.cost <= 0.5 * (_knee_residuals(x0, b, t) ** 2).sum() else x0
    alpha, floor, beta, p, q = (float(v) for v in _knee_params(x))
    return KneeModel(alpha, floor, beta, p, q)


def fit_power_law(batches: Sequence[float], seconds: Sequence[float]) -> PowerLawModel:
    """``PowerLawModel`` through the points (times made non-decreasing in b)."""
    b, t = np.asarray(batches, float), np.asarray(seconds, float)
    order = np.argsort(b)
    return PowerLawModel(tuple(b[order].tolist()), tuple(np.maximum.accumulate(t[order]).tolist()))


def fit_iter_time(batches: Sequence[float], seconds: Sequence[float]) -> IterTimeModel:
    """Fit a device's step time from at most four profiled (batch, seconds) pairs.

    Two candidate shapes: a smooth knee (``KneeModel``: flat while the device is under-used,
    then a power law, as on GPUs) and a piecewise power law (``PowerLawModel``: follows the
    irregular per-example cost of CPUs, whose kernels change with the batch). The one with the
    lower leave-one-out error on the interior profiled points is returned.

    Raises
    ------
    ValueError
        With fewer than 2 distinct batch sizes or a non-positive batch or time.
    """
    b, t = np.asarray(batches, float), np.asarray(seconds, float)
    if len(b) != len(t) or len(set(b.tolist())) < 2 or (b <= 0).any() or (t <= 0).any():
        raise ValueError(f"need >= 2 distinct (batch > 0, seconds > 0) pairs, got batches={list(b)} seconds={list(t)}")
    order = np.argsort(b)
    b, t = b[order], t[order]
    if len(b) < 3:
        return fit_power_law(b, t)
    errors = {}
    for fit in (fit_knee, fit_power_law):
        loo = [abs(fit(np.delete(b, j), np.delete(t, j))(b[j]) / t[j] - 1) for j in range(1, len(b) - 1)]
        errors[fit] = float(np.mean(loo))
    return min(errors, key=errors.get)(b, t)


def profile_batches(limit: int, count: int = 4) -> list[int]:
    """Batch sizes to profile a device at: ``count`` geometric steps from 1 to ``limit``.

    E.g. 1, 8, 64, 512 or 1, 16, 256, 4096: evenly spaced in log b, so the knee between the
    under-used and the saturated device is bracketed whatever the scale.
    """
    if limit < 1 or count < 2:
        raise ValueError(f"limit = {limit!r}, count = {count!r}: need limit >= 1 and count >= 2")
    return sorted({max(1, round(limit ** (k / (count - 1)))) for k in range(count)})


def comm_seconds(model_bytes: float, link) -> float:
    """Seconds to receive the weights and send the gradient back over a link.

    ``link`` has ``bandwidth_mbps`` (each way) and ``latency_ms`` (one way), e.g. a
    ``workloads.devices.DeviceProfile``.
    """
    return 2 * link.latency_ms / 1000 + 2 * model_bytes * 8 / (link.bandwidth_mbps * 1e6)


def client_virtual_seconds(compute_s: float, profile, model_bytes: float) -> float:
    """A client's round time on its simulated device: measured compute / speed + its link.

    ``profile`` is a ``workloads.devices.DeviceProfile`` or ``None`` (this machine, no link).
    """
    if profile is None:
        return compute_s
    return compute_s / profile.speed + comm_seconds(model_bytes, profile)


def round_seconds(compute_s: Sequence[float], comm_s: Sequence[float], server_s: float = 0.0,
                  round_latency_s: float = 0.0) -> float:
    """Synchronous round time, s: max_i (compute_i + comm_i) + server_s + round_latency_s (fixed per round)."""
    return max(c + m for c, m in zip(compute_s, comm_s)) + server_s + round_latency_s


def steps_factor(global_batch: float | np.ndarray, noise_scale: float) -> float | np.ndarray:
    """S(B) / S_min = 1 + B_noise / B: steps to a target relative to infinitely large batches."""
    return 1.0 + noise_scale / np.asarray(global_batch, dtype=float)


def pollux_efficiency(global_batch: float, base_batch: float, noise_scale: float) -> float:
    """Pollux's statistical efficiency (B_noise + B0) / (B_noise + B): progress per example."""
    return (noise_scale + base_batch) / (noise_scale + global_batch)


def split_for_equal_finish(
    global_batch: int, models: Sequence[IterTimeModel], comm_s: Sequence[float], max_batches: Sequence[int]
) -> list[int]:
    """Split ``global_batch`` so that every client finishes its step at about the same time.

    Faster clients get larger shares: find the round time T at which sum_i b_i(T) = B, with
    b_i(T) = t_i^-1(T - comm_i) capped at ``max_batches[i]`` (its memory limit), by bisection,
    then round to integers that sum to B (largest remainders). Every client gets >= 1 example.

    Raises
    ------
    ValueError
        When B exceeds the clients' total memory limit or is below the number of clients.
    """
    k = len(models)
    if not k <= global_batch <= sum(max_batches):
        raise ValueError(f"global batch {global_batch}: must be between {k} clients and their "
                         f"total memory limit {sum(max_batches)}")

    def sizes(T: float) -> np.ndarray:
        return np.array([min(float(m_max), max(1.0, m.inverse(T - c))) for m, c, m_max in zip(models, comm_s, max_batches)])

    lo, hi = 0.0, max(m(mx) + c for m, c, mx in zip(models, comm_s, max_batches)) * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sizes(mid).sum() < global_batch else (lo, mid)
    real = sizes(hi) * global_batch / sizes(hi).sum()
    out = np.minimum(np.maximum(np.floor(real), 1), max_batches).astype(int)
    order = np.argsort(-(real - out))
    i = 0
    while out.sum() < global_batch:  # largest remainders first, respecting the caps
        j = order[i % k]
        if out[j] < max_batches[j]:
            out[j] += 1
        i += 1
    while out.sum() > global_batch:
        j = int(np.argmax(out))
        out[j] -= 1
    return out.tolist()


@dataclass(frozen=True)
class BatchChoice:
    """The chosen global batch and what the model predicts for it."""

    global_batch: int
    split: list[int]  # b_i per client, same order as the inputs
    round_s: float  # predicted synchronous round time, s
    rel_time: float  # (1 + B_noise/B) * round_s: time to a target up to the constant S_min, s
    rel_cost: float  # (1 + B_noise/B) * sum_i compute_i: device-seconds to a target up to S_min
    table: list[tuple[int, float, float, float]]  # (B, round_s, rel_time, rel_cost) per candidate


def choose_batch(
    models: Sequence[IterTimeModel],
    comm_s: Sequence[float],
    max_batches: Sequence[int],
    noise_scale: float,
    server_s: float = 0.0,
    objective: str = "time",
    candidates: Sequence[int] | None = None,
    round_latency_s: float = 0.0,
) -> BatchChoice:
    """Pick the global batch (and its split) that reaches a target soonest, or cheapest.

    Every candidate B is split with ``split_for_equal_finish`` (faster clients get more,
    nobody beyond its memory limit), its round time predicted, and scored by
    ``(1 + B_noise / B) * round_s`` (``objective="time"``) or ``(1 + B_noise / B) * sum of the
    clients' compute seconds`` (``"cost"``, the paper's least-compute-cost batch). Candidates
    default to 50 geometrically spaced sizes between K and the total memory limit (AdaptDL's
    ``optimize`` scores a ``geomspace`` grid the same way). ``round_latency_s`` is a fixed cost
    per round (s) in ``round_s``: it favours larger batches under ``time``; ``cost`` counts
    compute only, so it ignores it.
    """
    if objective not in ("time", "cost"):
        raise ValueError(f"objective = {objective!r}: allowed 'time' or 'cost'")
    k, limit = len(models), int(sum(max_batches))
    if candidates is None:
        candidates = np.unique(np.geomspace(k, limit, 50).round().astype(int))
    table, best = [], None
    for B in (int(c) for c in candidates if k <= c <= limit):
        split = split_for_equal_finish(B, models, comm_s, max_batches)
        compute = [float(m(b)) for m, b in zip(models, split)]
        r_s = round_seconds(compute, comm_s, server_s, round_latency_s)
        factor = float(steps_factor(B, max(noise_scale, 0.0)))
        row = (B, r_s, factor * r_s, factor * sum(compute))
        table.append(row)
        score = row[2] if objective == "time" else row[3]
        if best is None or score < best[0]:
            best = (score, row, split)
    if best is None:
        raise ValueError(f"no candidate batch between {k} clients and the memory limit {limit}")
    _, (B, r_s, rel_time, rel_cost), split = best
    return BatchChoice(B, split, r_s, rel_time, rel_cost, table)
