"""Batch policies: how the server sets each client's local batch b_i.

``batch-policy`` (run config):

- ``fixed``: ``global-batch-size`` split evenly over the round's clients.
- ``memory-max``: every client at the largest batch its memory allows (the estimator's
  ``max_batch_size`` under its budget less ``memory-margin``, at most its partition).
- ``optimal``: the global batch and split that the performance model predicts reaches a target
  soonest (``batch-objective = time``) or with the least device-seconds (``cost``), via
  ``estimators.performance.choose_batch``. The noise scale it needs is measured first: the
  first ``calibration-rounds`` rounds run the fixed policy.

The two adaptive policies start with a probe (a Flower ``query`` message to every node):
each client reports its memory limit and its step time at four batch sizes, geometric from 1
to its limit (``profile_batches``), measured on its device. The server scales the times by the node's device-profile
speed and adds its link, as the virtual clock does (``client_virtual_seconds``). The probe's own
time on the slowest device goes on the virtual clock before round 1.
"""

from __future__ import annotations

import dataclasses
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
    capacities: list[ClientCapacity], noise_scale: float, server_s: float, objective: str
) -> tuple[dict[int, int], BatchChoice]:
    """``optimal``: ``choose_batch`` over these clients; b_i per partition id and the choice."""
    choice = choose_batch([c.step_model for c in capacities], [c.comm_s for c in capacities],
                          [c.max_batch for c in capacities], noise_scale, server_s, objective)
    return {c.partition_id: b for c, b in zip(capacities, choice.split)}, choice


@dataclass(frozen=True)
class PolicyMemory:
    """What the adaptive policies carry between rounds (a field of the checkpointed ``ServerState``).

    A value: ``BatchPolicy.plan`` and ``observe`` return a new one and never change this one.
    """

    capacities: tuple[ClientCapacity, ...] | None = None  # the probe's answers
    current: Mapping[int, int] | None = None  # b_i per partition id
    batch_plan: Mapping[str, Any] = field(default_factory=dict)  # what the policy chose and why (batch_plan.json)
    calibration: tuple[tuple[float, float], ...] = ()  # (b_simple, server_s) of calibration rounds

    def observe(self, cfg: RunConfig, rnd: int, b_simple: float, server_s: float) -> PolicyMemory:
        """Record a calibration round's noise scale and server time (``optimal`` only)."""
        if cfg.batch_policy == "optimal" and rnd <= cfg.calibration_rounds:
            return dataclasses.replace(self, calibration=(*self.calibration, (b_simple, server_s)))
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return {"capacities": None if self.capacities is None else [c.to_dict() for c in self.capacities],
                "current": None if self.current is None else dict(self.current), "batch_plan": dict(self.batch_plan),
                "calibration": list(self.calibration)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PolicyMemory:
        """Inverse of ``to_dict``."""
        caps = state["capacities"]
        return cls(None if caps is None else tuple(ClientCapacity.from_dict(c) for c in caps),
                   None if state["current"] is None else {int(k): int(v) for k, v in state["current"].items()},
                   dict(state["batch_plan"]), tuple(tuple(c) for c in state["calibration"]))


class BatchPolicy:
    """The adaptive policies: probe the clients, then plan b_i per partition (state in a ``PolicyMemory``).

    Plans are keyed by partition id, so they survive new node ids (a restarted simulation or
    SuperNode). When the set of connected partitions changes, the clients are probed again.
    """

    def __init__(self, cfg: RunConfig, profiles: tuple[DeviceProfile, ...], model_bytes: float) -> None:
        self.cfg, self.profiles, self.model_bytes = cfg, profiles, model_bytes

    def plan(self, memory: PolicyMemory, rnd: int, usable: dict[int, int], grid: Grid,
             timeout_s: float) -> tuple[PolicyMemory, Mapping[int, int] | None, float, bool]:
        """Plan round ``rnd``: the new memory, b_i per partition (None: the fixed even split), probe virtual s, replanned?"""
        policy = self.cfg.batch_policy
        if policy == "fixed":
            return memory, None, 0.0, False
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

    def _plan_optimal(self, memory: PolicyMemory) -> PolicyMemory:
        noise = [b for b, _ in memory.calibration if np.isfinite(b) and b > 0]
        noise_scale = float(np.median(noise)) if noise else float(self.cfg.global_batch_size)
        server_s = float(np.median([t for _, t in memory.calibration])) if memory.calibration else 0.0
        current, choice = optimal_plan(list(memory.capacities), noise_scale, server_s, self.cfg.batch_objective)
        batch_plan = {**memory.batch_plan, "noise_scale": noise_scale, "noise_measured": bool(noise),
                      "server_s": server_s, "objective": self.cfg.batch_objective, "global_batch": choice.global_batch,
                      "split": {str(p): b for p, b in current.items()}, "predicted_round_s": choice.round_s,
                      "candidates": [dict(zip(("B", "round_s", "rel_time", "rel_cost"), row)) for row in choice.table]}
        log(INFO, "batch policy optimal (%s): B_noise %.0f%s -> global batch %d, split by partition %s, "
            "predicted round %.3f s", self.cfg.batch_objective, noise_scale,
            "" if noise else " (not measured: global-batch-size)", choice.global_batch, choice.split, choice.round_s)
        return dataclasses.replace(memory, current=current, batch_plan=batch_plan)
