"""Fault injection around the real ClientApp, for tests and fault experiments (the app is unchanged).

``FaultyClientApp(app, schedule)`` answers train messages like ``app``, except where
``schedule(server_round, partition_id)`` returns a ``Fault``: the client then crashes, hangs,
or replies with a corrupted message (``corrupt``). Use it as the ``client_app`` of the
in-process grid (flb/inprocess.py).

Fault kinds (``Fault.kind``; ``value`` where it takes one):

=============  ==============================================================
crash          the ClientApp raises (Flower turns it into an error reply)
hang           sleeps ``value`` seconds, then raises (its reply never counts)
nan, inf       one gradient entry becomes NaN / +Inf
scale          every gradient entry times ``value`` (a liar or a broken device)
broadcast      the first gradient becomes shape (1, ...): broadcastable, wrong
extra          an unknown gradient tensor is added
missing        the first gradient tensor is removed
int-grad       the first gradient is sent as int64
lie            ``num-examples`` = ``value`` instead of the assigned b_i
no-metric      the ``compute-s`` metric is left out
nan-metric     ``train-loss`` is NaN
buffer-nan     a floating buffer gets a NaN (models with BatchNorm)
counter        ``num_batches_tracked`` buffers = ``value``
=============  ==============================================================
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from protocol import messages as proto

KINDS = ("crash", "hang", "nan", "inf", "scale", "broadcast", "extra", "missing", "int-grad", "lie",
         "no-metric", "nan-metric", "buffer-nan", "counter")


@dataclass(frozen=True)
class Fault:
    """One injected fault (see the module docstring for the kinds)."""

    kind: str
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kind {self.kind!r} is unknown; allowed: {', '.join(KINDS)}")


Schedule = Callable[[int, int], "Fault | None"]  # (server round, partition id) -> fault or None


class FaultyClientApp:
    """A ClientApp stand-in that injects the scheduled faults into train replies."""

    def __init__(self, app: Callable[[Message, object], Message], schedule: Schedule) -> None:
        self.app, self.schedule = app, schedule
        self.injected: list[tuple[int, int, str]] = []  # (round, partition, kind)

    def __call__(self, msg: Message, context) -> Message:
        """Answer ``msg`` like the wrapped app, with this round's fault if one is scheduled."""
        if msg.metadata.message_type != MessageType.TRAIN:
            return self.app(msg, context)
        rnd = int(msg.content["config"]["server-round"])
        pid = int(context.node_config["partition-id"])
        fault = self.schedule(rnd, pid)
        if fault is None:
            return self.app(msg, context)
        self.injected.append((rnd, pid, fault.kind))
        if fault.kind == "crash":
            raise RuntimeError(f"injected crash (round {rnd}, partition {pid})")
        if fault.kind == "hang":
            time.sleep(fault.value)
            raise RuntimeError(f"injected hang of {fault.value:g} s ended (round {rnd}, partition {pid})")
        return corrupt(self.app(msg, context), fault)


def corrupt(reply: Message, fault: Fault) -> Message:
    """Return a copy of a valid train reply with ``fault`` applied to its content."""
    grads = {k: v.clone() for k, v in reply.content[proto.GRADS].to_torch_state_dict().items()}
    metrics = dict(reply.content[proto.METRICS])
    buffers = (reply.content[proto.BUFFERS].to_torch_state_dict() if proto.BUFFERS in reply.content.array_records else None)
    first = next(iter(grads))
    if fault.kind in ("nan", "inf"):
        grads[first].view(-1)[0] = float("nan") if fault.kind == "nan" else float("inf")
    elif fault.kind == "scale":
        grads = {k: v * fault.value for k, v in grads.items()}
    elif fault.kind == "broadcast":
        grads[first] = grads[first][:1].clone()
    elif fault.kind == "extra":
        grads["injected.weight"] = torch.zeros(3)
    elif fault.kind == "missing":
        del grads[first]
    elif fault.kind == "int-grad":
        grads[first] = grads[first].long()
    elif fault.kind == "lie":
        metrics[proto.NUM_EXAMPLES] = int(fault.value)
    elif fault.kind == "no-metric":
        del metrics["compute-s"]
    elif fault.kind == "nan-metric":
        metrics[proto.TRAIN_LOSS] = float("nan")
    elif fault.kind in ("buffer-nan", "counter"):
        if buffers is None:
            raise ValueError(f"fault {fault.kind!r} needs a model with buffers (BatchNorm)")
        buffers = {k: v.clone() for k, v in buffers.items()}
        for k, v in buffers.items():
            if fault.kind == "buffer-nan" and v.is_floating_point():
                v.view(-1)[0] = float("nan")
                break
            if fault.kind == "counter" and not v.is_floating_point():
                v.fill_(int(fault.value))
    content = RecordDict({proto.GRADS: ArrayRecord(grads), proto.METRICS: MetricRecord(metrics)})
    if buffers is not None:
        content[proto.BUFFERS] = ArrayRecord(buffers)
    return Message(content=content, metadata=copy.deepcopy(reply.metadata))


def independent_dropouts(probability: float, seed: int) -> Schedule:
    """A schedule in which every train message to every client crashes with ``probability``, independently.

    A retried message of the same round is another draw (the n-th attempt of partition p in
    round r draws from ``default_rng([seed, r, p, n])``), so runs are reproducible.
    """
    attempts: dict[tuple[int, int], int] = {}

    def schedule(rnd: int, pid: int) -> Fault | None:
        n = attempts[(rnd, pid)] = attempts.get((rnd, pid), 0) + 1
        return Fault("crash") if np.random.default_rng([seed, rnd, pid, n]).random() < probability else None

    return schedule
