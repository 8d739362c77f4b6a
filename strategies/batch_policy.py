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

from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from estimators.performance import BatchChoice, IterTimeModel, choose_batch, comm_seconds, fit_iter_time
from workloads.devices import DeviceProfile, profile_for

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
    config = ConfigRecord({"probe-count": PROBE_COUNT})
    messages = [Message(content=RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=n)
                for n in nodes]
    out = []
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        if reply.has_error():
            raise ProbeFailure(f"node {reply.metadata.src_node_id}: capacity probe failed: {reply.error.reason}")
        m = reply.content["metrics"]
        profile = profile_for(profiles, int(m["partition-id"]))
        speed = profile.speed if profile else 1.0
        out.append(ClientCapacity(
            node_id=reply.metadata.src_node_id,
            partition_id=int(m["partition-id"]),
            max_batch=int(m["max-batch"]),
            step_model=fit_iter_time(list(m["probe-batches"]), list(m["probe-seconds"])).scaled(speed),
            comm_s=comm_seconds(model_bytes, profile) if profile else 0.0,
            probe_s=float(m["probe-compute-s"]) / speed + (2 * profile.latency_ms / 1000 if profile else 0.0),
        ))
    return sorted(out, key=lambda c: c.node_id)


def memory_max_plan(capacities: list[ClientCapacity]) -> dict[int, int]:
    """``memory-max``: b_i = the client's memory limit, per node id."""
    return {c.node_id: c.max_batch for c in capacities}


def optimal_plan(
    capacities: list[ClientCapacity], noise_scale: float, server_s: float, objective: str
) -> tuple[dict[int, int], BatchChoice]:
    """``optimal``: ``choose_batch`` over these clients; b_i per node id and the choice."""
    choice = choose_batch([c.step_model for c in capacities], [c.comm_s for c in capacities],
                          [c.max_batch for c in capacities], noise_scale, server_s, objective)
    return {c.node_id: b for c, b in zip(capacities, choice.split)}, choice
