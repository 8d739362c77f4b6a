"""Batch policies: how the server sets each client's local batch b_i.

``batch-policy`` (run config):

- ``fixed``: ``global-batch-size`` split evenly over the round's clients.
- ``memory-max``: every client at the largest batch its memory allows (the estimator's
  ``max_batch_size`` under its budget less ``memory-margin``, at most its partition).
- ``optimal``: the global batch and split that the performance model predicts reaches a target
  soonest (``batch-objective = time``) or with the least device-seconds (``cost``), via
  ``estimators.performance.choose_batch``. The noise scale it needs is measured first: the
  first ``calibration-rounds`` rounds run the fixed policy.

- ``step``: a batch schedule (Smith, Kindermans, Ying & Le 2018, "Don't Decay the Learning Rate,
  Increase the Batch Size"): round r's global batch is B_r = round(``global-batch-size`` x m(r)),
  m(r) the ``batch-steps`` multiplier in force (``start:multiplier``, as ``teacher-steps``),
  split evenly over the round's clients as ``fixed`` splits it. No probe.
- ``noise``: grows B with the measured gradient noise scale B_simple = tr(Sigma)/|G|^2
  (McCandlish et al. 2018): the round's unbiased estimates of tr(Sigma) and |G|^2 are averaged
  separately, T_r = batch-ema * T_{r-1} + (1 - batch-ema) * tr_sigma_r (the same for |G|^2; the
  first measurement starts them; rounds within ``warmup-rounds`` and non-finite ones are not
  used), and E = T / |G|^2-average once that is positive (McCandlish et al. App. A and AdaptDL
  average numerator and denominator apart: a near-zero |G|^2 of one round no longer makes a spike),
  B_r = max(B_{r-1}, clamp(round(E_{r-1}), global-batch-size, cap)), cap = the sum of the
  clients' probed memory limits and, with ``batch-time-cap`` (default), at most the performance
  model's time-optimal batch at B_noise = E (``noise_time_cap``).
  Rounds before any measurement use ``global-batch-size``. E and B live in ``PolicyMemory``.

The adaptive policies (all but ``fixed`` and ``step``) start with a probe (a Flower ``query`` message to every node):
each client reports its memory limit and its step time at four batch sizes, geometric from 1
to its limit (``profile_batches``), measured on its device. The server scales the times by the node's device-profile
speed and adds its link, as the virtual clock does (``client_virtual_seconds``). The probe's own
time on the slowest device goes on the virtual clock before round 1.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from estimators.performance import (
    BatchChoice, IterTimeModel, KneeModel, PowerLawModel, choose_batch, comm_seconds, fit_iter_time,
)
from strategies.noise_scale import NoiseStats
from strategies.teachers import parse_steps
from workloads.batches import split_global_batch
from workloads.config import RunConfig
from workloads.devices import DeviceProfile, profile_for
from protocol import messages as proto

PROBE_COUNT = 4  # profiled batch sizes per client: geometric from 1 to its memory limit


@dataclass(frozen=True)
class ClientCapacity:
    """What a client's probe reply says, and the server's model of it."""

    node_id: int
    partition_id: int
    max_batch: int  # largest b_i that fits its memory (and partition), examples
    step_model: IterTimeModel  # virtual seconds of a step vs b_i (profile speed applied)
    comm_s: float  # virtual seconds of its link per round (weights down, gradient up)
    probe_s: float  # virtual seconds the probe took on it (its steps / speed, plus a round trip)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        kind = "knee" if isinstance(self.step_model, KneeModel) else "power"
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "step_model"},
                "step_kind": kind, "step_params": dataclasses.asdict(self.step_model)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientCapacity:
        """Inverse of ``to_dict``."""
        params = dict(d["step_params"])
        if d["step_kind"] == "knee":
            model: IterTimeModel = KneeModel(**params)
        else:
            model = PowerLawModel(tuple(params["batches"]), tuple(params["seconds"]))
        return cls(int(d["node_id"]), int(d["partition_id"]), int(d["max_batch"]), model, float(d["comm_s"]),
                   float(d["probe_s"]))


class ProbeFailure(RuntimeError):
    """A client could not answer the capacity probe."""


def probe_clients(
    grid: Grid, nodes: list[int], profiles: tuple[DeviceProfile, ...], model_bytes: float, timeout_s: float = 600.0
) -> list[ClientCapacity]:
    """Ask every node for its memory limit and step times; fit its step-time model.

    Raises
    ------
    ProbeFailure
        If a node replies with an error, naming the node and its reason.
    """
    config = ConfigRecord({proto.PROBE_COUNT: PROBE_COUNT})
    messages = [Message(content=RecordDict({proto.CONFIG: config}), message_type=MessageType.QUERY, dst_node_id=n)
                for n in nodes]
    out = []
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    silent = sorted(set(nodes) - {r.metadata.src_node_id for r in replies})
    if silent:
        raise ProbeFailure(f"nodes {silent} did not answer the capacity probe within {timeout_s:g} s")
    for reply in replies:
        if reply.has_error():
            raise ProbeFailure(f"node {reply.metadata.src_node_id}: capacity probe failed: {reply.error.reason}")
        m = reply.content[proto.METRICS]
        profile = profile_for(profiles, int(m[proto.PARTITION_ID]))
        speed = profile.speed if profile else 1.0
        out.append(ClientCapacity(
            node_id=reply.metadata.src_node_id,
            partition_id=int(m[proto.PARTITION_ID]),
            max_batch=int(m[proto.MAX_BATCH]),
            step_model=fit_iter_time(list(m[proto.PROBE_BATCHES]), list(m[proto.PROBE_SECONDS])).scaled(speed),
            comm_s=comm_seconds(model_bytes, profile) if profile else 0.0,
            probe_s=float(m[proto.PROBE_COMPUTE_S]) / speed + (2 * profile.latency_ms / 1000 if profile else 0.0),
        ))
    return sorted(out, key=lambda c: c.node_id)


def memory_max_plan(capacities: list[ClientCapacity]) -> dict[int, int]:
    """``memory-max``: b_i = the client's memory limit, per partition id."""
    return {c.partition_id: c.max_batch for c in capacities}


def optimal_plan(
    capacities: list[ClientCapacity], noise_scale: float, server_s: float, objective: str,
    round_latency_s: float = 0.0,
) -> tuple[dict[int, int], BatchChoice]:
    """``optimal``: ``choose_batch`` over these clients, ``round_latency_s`` a round; b_i per partition, the choice."""
    choice = choose_batch([c.step_model for c in capacities], [c.comm_s for c in capacities],
                          [c.max_batch for c in capacities], noise_scale, server_s, objective,
                          round_latency_s=round_latency_s)
    return {c.partition_id: b for c, b in zip(capacities, choice.split)}, choice


def noise_time_cap(capacities: list[ClientCapacity], noise_scale: float, round_latency_s: float) -> int:
    """The batch past which more batch stops buying time: ``choose_batch``'s time-optimal B at ``noise_scale``, examples.

    It minimises (1 + B_noise / B) x round_s(B) over the clients' step-time models, links and memory limits
    (the ``optimal`` policy's score, McCandlish et al. 2018 / Pollux), ``round_latency_s`` a round.
    """
    return optimal_plan(capacities, noise_scale, 0.0, "time", round_latency_s)[1].global_batch


def round_clients(clients_per_round: int, usable: int) -> int:
    """K, the round's client count: ``clients-per-round`` (0 = all) but at most the usable nodes."""
    return min(clients_per_round, usable) if clients_per_round else usable


def scheduled_batch(global_batch: int, steps: list[tuple[int, float]], rnd: int) -> int:
    """``step``: B_r = round(global_batch x m(r)), examples; m(r) the last multiplier whose start <= r - 1.

    ``steps`` is ``parse_steps(batch-steps)``; a start s applies after s completed rounds (as the
    ``step`` teacher). Smith et al. 2018 multiply B where a step lr schedule would divide lr.
    """
    m = [m for start, m in steps if start <= rnd - 1][-1]
    return max(1, int(round(global_batch * m)))


def largest_scheduled_batch(global_batch: int, steps: list[tuple[int, float]], num_rounds: int) -> int:
    """The largest B_r of ``scheduled_batch`` over rounds 1..num_rounds, examples."""
    return max(scheduled_batch(global_batch, steps, start + 1) for start, _ in steps if start < num_rounds)


def noise_moments(previous: tuple[float, float] | None, tr_sigma: float, grad_sq: float, decay: float
                  ) -> tuple[float, float] | None:
    """EMAs (decay per round) of the unbiased tr(Sigma) and |mu|^2 estimates, squared gradient units.

    The first finite pair starts them; a non-finite one (a single client) leaves them as they were.
    A negative |mu|^2 estimate is kept: it is unbiased, and dropping it would bias the average up.
    """
    if not (math.isfinite(tr_sigma) and math.isfinite(grad_sq)):
        return previous
    if previous is None:
        return tr_sigma, grad_sq
    return decay * previous[0] + (1.0 - decay) * tr_sigma, decay * previous[1] + (1.0 - decay) * grad_sq


def noise_scale_of(moments: tuple[float, float] | None) -> float | None:
    """E = averaged tr(Sigma) / averaged |mu|^2, examples (McCandlish et al. 2018); None while |mu|^2 <= 0."""
    if moments is None or moments[1] <= 0 or moments[0] < 0:
        return None
    return moments[0] / moments[1]


def noise_batch(previous: int, ema: float | None, global_batch: int, cap: int) -> int:
    """``noise``: B_r = max(B_{r-1}, clamp(round(E), global_batch, max(cap, global_batch))), examples.

    ``ema`` is the EMA of B_simple over the rounds before r (None: none measured, B_r = global_batch);
    ``cap`` is the fleet's memory limit (the sum of the round's clients' probed b_i limits).
    """
    target = global_batch if ema is None else min(max(int(round(ema)), global_batch), max(cap, global_batch))
    return max(previous, target)


def noise_batches(stats: list[tuple[float, float]], global_batch: int, cap: int, decay: float,
                  skip: int = 0) -> list[int]:
    """B_1..B_n of the ``noise`` policy when round r measures ``stats[r-1]`` = (tr_sigma, grad_sq); B_r sees
    rounds < r; the first ``skip`` rounds (``warmup-rounds``) are not used."""
    out, moments, batch = [], None, 0
    for r, (tr_sigma, grad_sq) in enumerate(stats, start=1):
        previous = moments
        batch = noise_batch(batch, noise_scale_of(previous), global_batch, cap)
        out.append(batch)
        moments = previous if r <= skip else noise_moments(previous, tr_sigma, grad_sq, decay)
    return out


def split_batch(total: int, partitions: list[int], k: int, limits: Mapping[int, int] | None = None) -> dict[int, int]:
    """b_i per partition for a global batch of ``total`` over a round of ``k`` of these ``partitions``.

    When every partition is in the round (k = len(partitions)), ``total`` is split as
    ``split_global_batch`` splits it (in partition order), except that a client above its
    ``limits`` entry is held at it and the rest is split again over the others. When the round
    samples k < len(partitions) clients, which ones is not known here: every partition gets
    round(total / k), at most the smallest limit, so the round's B is k times that.
    """
    parts = sorted(partitions)
    cap = {p: (limits or {}).get(p, total) for p in parts}
    if k < len(parts):
        b = max(1, min(int(round(total / k)), min(cap.values())))
        return {p: b for p in parts}
    out: dict[int, int] = {}
    free, rest = list(parts), total
    while free:
        share = dict(zip(free, split_global_batch(max(rest, len(free)), len(free))))
        over = [p for p in free if share[p] > cap[p]]
        if not over:
            return out | share
        for p in over:
            out[p] = cap[p]
            rest -= cap[p]
            free.remove(p)
    return out


@dataclass(frozen=True)
class PolicyMemory:
    """What the adaptive policies carry between rounds (a field of the checkpointed ``ServerState``).

    A value: ``BatchPolicy.plan`` and ``observe`` return a new one and never change this one.
    """

    capacities: tuple[ClientCapacity, ...] | None = None  # the probe's answers
    current: Mapping[int, int] | None = None  # b_i per partition id
    batch_plan: Mapping[str, Any] = field(default_factory=dict)  # what the policy chose and why (batch_plan.json)
    calibration: tuple[tuple[float, float], ...] = ()  # (b_simple, server_s) of calibration rounds
    noise_ema: float | None = None  # ``noise``: the averaged noise scale E so far, examples (None: none yet)
    noise_batch: int = 0  # ``noise``: the last round's global batch B, examples (0: no round planned yet)
    noise_moments: tuple[float, float] | None = None  # ``noise``: EMAs of tr_sigma and grad_sq (``noise_moments``)

    def observe(self, cfg: RunConfig, rnd: int, stats: NoiseStats, server_s: float) -> PolicyMemory:
        """Record a round's noise statistics: a calibration round's B_simple and server time (``optimal``), the
        averages (``noise``, after ``warmup-rounds``)."""
        if cfg.batch_policy == "optimal" and rnd <= cfg.calibration_rounds:
            return dataclasses.replace(self, calibration=(*self.calibration, (stats.b_simple, server_s)))
        if cfg.batch_policy == "noise" and rnd > cfg.warmup_rounds:
            moments = noise_moments(self.noise_moments, stats.tr_sigma, stats.grad_sq, cfg.batch_ema)
            scale = noise_scale_of(moments)
            return dataclasses.replace(self, noise_moments=moments,
                                       noise_ema=self.noise_ema if scale is None else scale)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return {"capacities": None if self.capacities is None else [c.to_dict() for c in self.capacities],
                "current": None if self.current is None else dict(self.current), "batch_plan": dict(self.batch_plan),
                "calibration": list(self.calibration), "noise_ema": self.noise_ema, "noise_batch": self.noise_batch,
                "noise_moments": None if self.noise_moments is None else list(self.noise_moments)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PolicyMemory:
        """Inverse of ``to_dict`` (also of a checkpoint written before the ``noise`` policy existed)."""
        caps, ema, moments = state["capacities"], state.get("noise_ema"), state.get("noise_moments")
        return cls(None if caps is None else tuple(ClientCapacity.from_dict(c) for c in caps),
                   None if state["current"] is None else {int(k): int(v) for k, v in state["current"].items()},
                   dict(state["batch_plan"]), tuple(tuple(c) for c in state["calibration"]),
                   None if ema is None else float(ema), int(state.get("noise_batch", 0)),
                   None if moments is None else (float(moments[0]), float(moments[1])))


class BatchPolicy:
    """The adaptive policies: probe the clients, then plan b_i per partition (state in a ``PolicyMemory``).

    Plans are keyed by partition id, so they survive new node ids (a restarted simulation or
    SuperNode). When the set of connected partitions changes, the clients are probed again.
    """

    def __init__(self, cfg: RunConfig, profiles: tuple[DeviceProfile, ...], model_bytes: float) -> None:
        self.cfg, self.profiles, self.model_bytes = cfg, profiles, model_bytes
        self.steps = parse_steps(cfg.batch_steps, cfg.num_server_rounds, "batch-steps")

    def plan(self, memory: PolicyMemory, rnd: int, usable: dict[int, int], grid: Grid,
             timeout_s: float) -> tuple[PolicyMemory, Mapping[int, int] | None, float, bool]:
        """Plan round ``rnd``: the new memory, b_i per partition (None: the fixed even split), probe virtual s, replanned?"""
        policy = self.cfg.batch_policy
        if policy == "fixed":
            return memory, None, 0.0, False
        if policy == "step":
            total = scheduled_batch(self.cfg.global_batch_size, self.steps, rnd)
            k = round_clients(self.cfg.clients_per_round, len(usable))
            return memory, split_batch(total, list(usable.values()), k), 0.0, False
        probe_virtual_s, replanned = 0.0, False
        if memory.capacities is not None and {c.partition_id for c in memory.capacities} != set(usable.values()):
            log(INFO, "batch policy %s: the connected partitions changed; probing and planning again", policy)
            memory = dataclasses.replace(memory, capacities=None, current=None)
        if memory.capacities is None:
            t0 = time.perf_counter()
            caps = probe_clients(grid, list(usable), self.profiles, self.model_bytes, timeout_s)
            probe_virtual_s = max(c.probe_s for c in caps)
            batch_plan = {"policy": policy, "probe_s": time.perf_counter() - t0, "probe_virtual_s": probe_virtual_s,
                          "clients": [{"node_id": c.node_id, "partition_id": c.partition_id, "max_batch": c.max_batch,
                                       "comm_s": c.comm_s, "step_s_at_max": float(c.step_model(c.max_batch))}
                                      for c in caps]}
            memory = dataclasses.replace(memory, capacities=tuple(caps), batch_plan=batch_plan)
            replanned = True
            log(INFO, "batch policy %s: probed %d clients in %.1f s; memory limits %s", policy,
                len(caps), batch_plan["probe_s"], [c.max_batch for c in caps])
        if policy == "noise":
            memory = self._plan_noise(memory, rnd, len(usable))
            return memory, memory.current, probe_virtual_s, replanned
        if policy == "memory-max":
            if not memory.current:
                memory = dataclasses.replace(memory, current=memory_max_plan(list(memory.capacities)))
            return memory, memory.current, probe_virtual_s, replanned
        if rnd <= self.cfg.calibration_rounds:
            return memory, None, probe_virtual_s, replanned
        if memory.current is None:
            memory = self._plan_optimal(memory)
            replanned = True
        return memory, memory.current, probe_virtual_s, replanned

    def _plan_noise(self, memory: PolicyMemory, rnd: int, usable: int) -> PolicyMemory:
        """``noise``: B_r from the EMA so far (``noise_batch``), split over the probed clients within their limits."""
        limits = {c.partition_id: c.max_batch for c in memory.capacities}
        k = round_clients(self.cfg.clients_per_round, usable)
        cap = sum(limits.values()) if k == len(limits) else k * min(limits.values())
        time_cap = 0
        if self.cfg.batch_time_cap and memory.noise_ema is not None and k == len(limits):
            time_cap = noise_time_cap(list(memory.capacities), memory.noise_ema, self.cfg.round_latency_s)
            cap = min(cap, max(time_cap, self.cfg.global_batch_size))
        total = noise_batch(memory.noise_batch, memory.noise_ema, self.cfg.global_batch_size, cap)
        if total != memory.noise_batch:
            log(INFO, "batch policy noise: round %d, B_simple EMA %s -> global batch %d (cap %d%s)", rnd,
                "not measured" if memory.noise_ema is None else f"{memory.noise_ema:.1f}", total, cap,
                f"; time-optimal {time_cap}" if time_cap else "")
        current = split_batch(total, list(limits), k, limits)
        return dataclasses.replace(memory, current=current, noise_batch=total)

    def _plan_optimal(self, memory: PolicyMemory) -> PolicyMemory:
        noise = [b for b, _ in memory.calibration if np.isfinite(b) and b > 0]
        noise_scale = float(np.median(noise)) if noise else float(self.cfg.global_batch_size)
        server_s = float(np.median([t for _, t in memory.calibration])) if memory.calibration else 0.0
        current, choice = optimal_plan(list(memory.capacities), noise_scale, server_s, self.cfg.batch_objective,
                                       self.cfg.round_latency_s)
        batch_plan = {**memory.batch_plan, "noise_scale": noise_scale, "noise_measured": bool(noise),
                      "server_s": server_s, "round_latency_s": self.cfg.round_latency_s,
                      "objective": self.cfg.batch_objective, "global_batch": choice.global_batch,
                      "split": {str(p): b for p, b in current.items()}, "predicted_round_s": choice.round_s,
                      "candidates": [dict(zip(("B", "round_s", "rel_time", "rel_cost"), row)) for row in choice.table]}
        log(INFO, "batch policy optimal (%s): B_noise %.0f%s -> global batch %d, split by partition %s, "
            "predicted round %.3f s", self.cfg.batch_objective, noise_scale,
            "" if noise else " (not measured: global-batch-size)", choice.global_batch, choice.split, choice.round_s)
        return dataclasses.replace(memory, current=current, batch_plan=batch_plan)
