"""Robust aggregation of the clients' gradients: centered clipping, weighted median, trimmed mean, Krum.

Each takes K clients' tensors (the same shapes for every client) and weights w_i = b_i, and
returns one list of tensors, like ``aggregation.weighted_mean``. None of them equals the mean
over the union batch (the exact large-batch step) in general; the mean does.

- ``centered_clip`` (Karimireddy, He and Jaggi, ICML 2021, "Learning from History for
  Byzantine Robust Optimization", Algorithm 1): starting from the previous aggregate v,
  L times ``v <- v + sum_i w_i * clip_tau(x_i - v) / sum_i w_i`` with
  ``clip_tau(d) = d * min(1, tau / |d|)``. The paper feeds it the workers' momenta
  m_i = beta * m_i + g_i (``worker_momenta``); every honest vector then varies little from
  one round to the next, which is what defeats attacks spread over time.
- ``weighted_median``: per coordinate, the smallest value whose cumulative weight reaches
  half the total (Yin et al. 2018, coordinate-wise median, here weighted by b_i).
- ``trimmed_mean``: per coordinate, the weighted mean after removing ``trim`` of the total
  weight from each end (Yin et al. 2018, weighted by b_i; a boundary client counts in part).
- ``krum`` (Blanchard et al. 2017): the one client whose squared distances to its
  K - f - 2 nearest others sum least; the weights are not used.
- ``bucket_means`` (Karimireddy, He and Jaggi, ICLR 2022, "Byzantine-Robust Learning on
  Heterogeneous Datasets via Bucketing", Algorithm 1): the K clients in a random order, cut
  into ceil(K / s) buckets of s, each replaced by its b_i-weighted mean with weight sum b_i.
  Any of the rules above then runs on the buckets: the honest inputs vary s times less, and
  f attackers reach at most f of the buckets, each diluted by its honest members.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from strategies.aggregation import weighted_mean
from workloads.config import AGGREGATORS, RunConfig


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float32 vector of every entry of ``tensors``, in order."""
    return torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``vector`` cut into tensors of the shapes of ``like`` (float32)."""
    out, start = [], 0
    for t in like:
        out.append(vector[start:start + t.numel()].reshape(t.shape).clone())
        start += t.numel()
    return out


def _stack(arrays: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(arrays) != len(weights) or not arrays:
        raise ValueError(f"need one weight per client, got {len(arrays)} clients and {len(weights)} weights")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if float(w.sum()) <= 0 or float(w.min()) < 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    return torch.stack([flatten(a) for a in arrays]), w


def centered_clip(x: torch.Tensor, w: torch.Tensor, center: torch.Tensor, radius: float, iterations: int,
                  radius_scale: float = 1.0, drop_ratio: float = 0.0) -> torch.Tensor:
    """Iterated centered clipping of the rows of ``x`` (K x D) around ``center`` (D); ``radius`` 0 = auto.

    ``radius`` (tau) is in the units of the rows; 0 takes ``radius_scale`` times the weighted median
    of the distances |x_i - center|: while honest rows hold more than half of the weight it lies
    between two honest distances, but rows placed near ``center`` can make it small.
    ``drop_ratio`` r > 1 gives no weight to the rows farther than r times that median (0 = keep
    every row): a clipped row still pulls by tau, a dropped one not at all.
    """
    v = center.to(torch.float64)
    x = x.to(torch.float64)
    if radius <= 0 or drop_ratio > 0:  # both measured in median distances; a fixed radius needs no sort
        dist = (x - v).norm(dim=1)
        median = float(weighted_median(dist[:, None], w)[0])
        radius = radius if radius > 0 else radius_scale * median
    if drop_ratio > 0:
        kept = w.to(torch.float64) * (dist <= drop_ratio * median)
        share = kept / kept.sum()
    else:
        share = (w / w.sum()).to(torch.float64)
    for _ in range(iterations):
        d = x - v
        scale = torch.clamp(radius / d.norm(dim=1).clamp_min(1e-30), max=1.0)
        v = v + (share * scale) @ d
    return v.to(torch.float32)


def bucket_means(x: torch.Tensor, w: torch.Tensor, size: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (K x D) in a random order, averaged (weights ``w``) in buckets of ``size``; the buckets' weights.

    The weighted mean of the bucket means, weighted by the buckets' weight sums, is the weighted
    mean of the rows: bucketing leaves the exact step unchanged.
    """
    if size < 1:
        raise ValueError(f"bucket size must be at least 1, got {size}")
    order = torch.randperm(x.shape[0], generator=generator)
    rows, weights = [], []
    for chunk in order.split(size):
        wc = w[chunk].to(torch.float64)
        rows.append((wc @ x[chunk].to(torch.float64)) / wc.sum())
        weights.append(wc.sum())
    return torch.stack(rows).to(x.dtype), torch.stack(weights)


def weighted_median(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per column of ``x`` (K x D): the smallest value whose cumulative weight reaches half of ``w.sum()``."""
    values, order = torch.sort(x, dim=0)
    cum = torch.cumsum(w.to(torch.float64)[order], dim=0)
    first = (cum < cum[-1:] * 0.5 * (1 - 1e-12)).sum(dim=0, keepdim=True)
    return values.gather(0, first.clamp(max=x.shape[0] - 1))[0]


def trimmed_mean(x: torch.Tensor, w: torch.Tensor, trim: float) -> torch.Tensor:
    """Per column of ``x`` (K x D): the weighted mean after removing ``trim`` of the weight from each end."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    values, order = torch.sort(x.to(torch.float64), dim=0)
    ws = w.to(torch.float64)[order]
    cum = torch.cumsum(ws, dim=0)
    total = cum[-1:]
    low, high = trim * total, (1 - trim) * total
    kept = (torch.minimum(cum, high) - torch.maximum(cum - ws, low)).clamp_min(0)
    return ((kept * values).sum(dim=0) / kept.sum(dim=0)).to(torch.float32)


def krum(x: torch.Tensor, f: int) -> int:
    """The index of the row of ``x`` (K x D) with the least sum of squared distances to its K - f - 2 nearest."""
    k = x.shape[0]
    near = max(1, k - f - 2)
    if k == 1:
        return 0
    dist = torch.cdist(x.to(torch.float64), x.to(torch.float64)) ** 2
    dist.fill_diagonal_(math.inf)
    scores = torch.sort(dist, dim=1).values[:, :min(near, k - 1)].sum(dim=1)
    return int(torch.argmin(scores))


@dataclass(frozen=True)
class Aggregator:
    """The run's aggregation rule (run-config keys ``aggregator``, ``cc-radius``, ``cc-iterations``,
    ``cc-radius-scale``, ``cc-drop-ratio``, ``byzantine-fraction``, ``bucket-size``)."""

    name: str = "mean"
    radius: float = 0.0  # centered-clip: tau; 0 = the weighted median distance (auto)
    iterations: int = 3  # centered-clip: L
    byzantine_fraction: float = 0.2  # krum: f = floor(fraction * K); trimmed-mean: the weight trimmed at each end
    radius_scale: float = 1.5  # centered-clip with the auto radius: tau = scale * the median distance
    bucket_size: int = 1  # clients averaged per random bucket before the rule (1 = off)
    drop_ratio: float = 10.0  # centered-clip: no weight beyond this many median distances (0 = off)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Aggregator:
        """The aggregator the run config names."""
        return cls(cfg.aggregator, cfg.cc_radius, cfg.cc_iterations, cfg.byzantine_fraction, cfg.cc_radius_scale,
                   cfg.bucket_size, cfg.cc_drop_ratio)

    def __post_init__(self) -> None:
        if self.name not in AGGREGATORS:
            raise ValueError(f"aggregator {self.name!r} is unknown; allowed: {', '.join(AGGREGATORS)}")

    def __call__(self, arrays: Sequence[Sequence[torch.Tensor]], weights: Sequence[float],
                 center: Sequence[torch.Tensor] | None = None, seed: int = 0) -> list[torch.Tensor]:
        """The aggregate of ``arrays[i]`` (client i's tensors) with weights b_i; ``center``: centered-clip's v;
        ``seed``: the buckets' random order (``bucket-size`` > 1)."""
        if self.name == "mean":
            return weighted_mean(arrays, weights)
        x, w = _stack(arrays, weights)
        if self.bucket_size > 1:
            x, w = bucket_means(x, w, self.bucket_size, torch.Generator().manual_seed(seed))
        if self.name == "centered-clip":
            start = torch.zeros(x.shape[1]) if center is None else flatten(center)
            out = centered_clip(x, w, start, self.radius, self.iterations, self.radius_scale, self.drop_ratio)
        elif self.name == "median":
            out = weighted_median(x, w)
        elif self.name == "trimmed-mean":
            out = trimmed_mean(x, w, self.byzantine_fraction)
        else:
            out = x[krum(x, math.floor(self.byzantine_fraction * len(arrays) + 1e-9))]  # (0.29 * 100 = 28.999...)
        return unflatten(out, arrays[0])


def worker_momenta(grads: Sequence[Sequence[torch.Tensor]], partitions: Sequence[int], beta: float,
                   previous: Mapping[int, Sequence[torch.Tensor]], center: Sequence[torch.Tensor] | None
                   ) -> dict[int, list[torch.Tensor]]:
    """Each client's momentum m_i = beta * m_i + g_i, kept by the server per partition id.

    Clients run in a fresh process every round, so the server keeps m_i; a client can send any
    g_i it likes, hence any m_i, so this gives an attacker nothing it would not have with
    momentum on the device. A client seen for the first time starts from the previous
    aggregate ``center`` (zero in round 1). Returns the momenta of ``partitions`` only.
    """
    out = {}
    for pid, g in zip(partitions, grads):
        history = previous.get(pid, center)
        if history is None or not beta:
            out[pid] = [t.to(torch.float32).clone() for t in g]
        else:
            out[pid] = [h.to(torch.float32) * beta + t.to(torch.float32) for h, t in zip(history, g)]
    return out
