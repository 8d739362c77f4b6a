"""The messages of a round, typed: what the server sends a client, and what the reply holds.

One train round is one exchange per sampled client (message type ``train``):

- **Instruction** (server -> client): the global weights (``arrays``), the ``config`` record
  (``TrainInstruction``: round, b_i, micro-batch, local steps H, lr, the sampler position) and,
  when a teacher's round plan asks for it, per-step learning rates, the server's momentum and
  weight decay with its ``velocity`` ArrayRecord, and this client's gradient multiplier m_i.
- **Reply** (client -> server): ``grads`` (mean-loss gradient of b_i examples, or the
  pseudo-gradient of H local steps), ``buffers`` (BatchNorm statistics, if any), ``velocity``
  (the final local velocity, only when the server's optimizer ran on the client), ``metrics``
  (``ReplyMetrics``) and ``info`` (where the client ran).

Two queries precede training: ``query.identify`` (the node's partition) and the capacity probe
(``query``: the memory limit and step times at ``probe-count`` batch sizes). Keys are the
constants below; no other module spells them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from protocol.arrays import record_tensors, tensors_record

# Records of a message's content.
ARRAYS, CONFIG, METRICS, INFO = "arrays", "config", "metrics", "info"
GRADS, BUFFERS, VELOCITY = "grads", "buffers", "velocity"  # VELOCITY: the server's, or a client's final one

# The instruction's config record.
SERVER_ROUND, LOCAL_BATCH, MICRO_BATCH = "server-round", "local-batch-size", "micro-batch-size"
LOCAL_STEPS, LR, DRAWN = "local-steps", "lr", "drawn-examples"
LOCAL_LRS, SERVER_MOMENTUM, WEIGHT_DECAY, GRAD_SCALE = "local-lrs", "momentum", "weight-decay", "grad-scale"
SEND_VELOCITY = "send-velocity"  # False: the server rebuilds the mean velocity from the weights (teacher-velocity)
PROBE_COUNT = "probe-count"  # capacity probe: how many batch sizes to time

# Reply metrics (every train reply has the first block).
NUM_EXAMPLES, TRAIN_LOSS, COMPUTE_S, PEAK_MEM_MB = "num-examples", "train-loss", "compute-s", "peak-mem-mb"
PREDICTED_PEAK_MB, BUDGET_MB, MAX_BATCH = "predicted-peak-mb", "budget-mb", "max-batch"
PARTITION_ID, PARTITION_SIZE, NUM_PARTITIONS = "partition-id", "partition-size", "num-partitions"
STARTUP_S, SETUP_S, GRAD_SQ = "startup-s", "setup-s", "grad-sq"
PROBE_BATCHES, PROBE_SECONDS, PROBE_COMPUTE_S = "probe-batches", "probe-seconds", "probe-compute-s"
PRE_CLIP_NORM = "pre-clip-norm"  # client-level DP: |g_i| before the client clipped it to dp-clip-norm
RAY_NODE = "ray-node"  # info: the Ray node a simulated client ran on


@dataclass(frozen=True)
class LocalOptimizer:
    """What a teacher's round plan asks of this client's step; the default changes nothing."""

    lrs: list[float] | None = None  # one learning rate per local step
    momentum: float = 0.0  # > 0: continue the server's optimizer (momentum, weight decay) from its velocity
    weight_decay: float = 0.0
    velocity: dict[str, torch.Tensor] | None = None  # the server's velocity, by parameter name
    grad_scale: float = 1.0  # m_i, applied to the gradient before the reply
    scaled: bool = False  # the round has multipliers: the reply also carries |g_i|^2 (``grad-sq``)
    send_velocity: bool = True  # with momentum: the reply carries the final velocity

    def config(self) -> dict[str, Any]:
        """The optional config entries (none for the plain step)."""
        out: dict[str, Any] = {}
        if self.lrs is not None:
            out[LOCAL_LRS] = [float(x) for x in self.lrs]
        if self.momentum:
            out |= {SERVER_MOMENTUM: float(self.momentum), WEIGHT_DECAY: float(self.weight_decay)}
            if not self.send_velocity:
                out[SEND_VELOCITY] = False
        if self.scaled:
            out[GRAD_SCALE] = float(self.grad_scale)
        return out

    @classmethod
    def from_content(cls, content: RecordDict) -> LocalOptimizer:
        """Read the optional config entries and the ``velocity`` ArrayRecord."""
        conf = content[CONFIG]
        velocity = record_tensors(content[VELOCITY]) if VELOCITY in content.array_records else None
        return cls(lrs=[float(x) for x in conf[LOCAL_LRS]] if LOCAL_LRS in conf else None,
                   momentum=float(conf.get(SERVER_MOMENTUM, 0.0)), weight_decay=float(conf.get(WEIGHT_DECAY, 0.0)),
                   velocity=velocity, grad_scale=float(conf.get(GRAD_SCALE, 1.0)), scaled=GRAD_SCALE in conf,
                   send_velocity=bool(conf.get(SEND_VELOCITY, True)))

    @property
    def plain(self) -> bool:
        """No local optimizer: a one-step round is the batch gradient."""
        return self.lrs is None and not self.momentum

    def velocity_for(self, model: torch.nn.Module) -> list[torch.Tensor] | None:
        """The server's velocity in ``model.parameters()`` order (None: start it at the first step)."""
        return None if self.velocity is None else [self.velocity[n] for n, _ in model.named_parameters()]


@dataclass(frozen=True)
class TrainInstruction:
    """The server's train message to one client."""

    server_round: int
    local_batch: int  # b_i, examples
    micro_batch: int  # examples per forward/backward
    local_steps: int  # H
    lr: float
    drawn: int  # examples of this partition's epoch-wise shuffle already drawn
    local: LocalOptimizer = field(default_factory=LocalOptimizer)

    def to_content(self, arrays: ArrayRecord, velocity: ArrayRecord | None = None) -> RecordDict:
        """The message content: weights, config and (for a local optimizer) the server's velocity."""
        config = ConfigRecord({SERVER_ROUND: self.server_round, LOCAL_BATCH: self.local_batch,
                               MICRO_BATCH: self.micro_batch, LOCAL_STEPS: self.local_steps, LR: self.lr,
                               DRAWN: self.drawn, **self.local.config()})
        content = RecordDict({ARRAYS: arrays, CONFIG: config})
        if velocity is not None:
            content[VELOCITY] = velocity
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainInstruction:
        conf = content[CONFIG]
        return cls(int(conf[SERVER_ROUND]), int(conf[LOCAL_BATCH]), int(conf[MICRO_BATCH]), int(conf[LOCAL_STEPS]),
                   float(conf[LR]), int(conf[DRAWN]), LocalOptimizer.from_content(content))


def round_of(content: RecordDict) -> int:
    """The server round a train instruction belongs to."""
    return int(content[CONFIG][SERVER_ROUND])


def reply_content(names: Sequence[str], grads: Sequence[torch.Tensor], metrics: Mapping[str, Any],
                  buffers: Mapping[str, torch.Tensor] | None = None,
                  velocity: Sequence[torch.Tensor] | None = None, info: Mapping[str, Any] | None = None) -> RecordDict:
    """A train reply: gradient by parameter name, metrics, and the optional records."""
    content = RecordDict({GRADS: tensors_record(dict(zip(names, grads))), METRICS: MetricRecord(dict(metrics))})
    if buffers:
        content[BUFFERS] = tensors_record(buffers)
    if velocity is not None:
        content[VELOCITY] = tensors_record(dict(zip(names, velocity)))
    if info is not None:
        content[INFO] = ConfigRecord(dict(info))
    return content


@dataclass
class ReplyRecords:
    """A train reply's records, read but not yet checked (strategies/reply_check.py checks them)."""

    grads: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor] | None
    velocity: dict[str, torch.Tensor]  # empty unless the server's optimizer ran on the client
    metrics: dict[str, Any]
    info: dict[str, str]


def read_reply(content: RecordDict) -> ReplyRecords | str:
    """The reply's records, or why they cannot be read (whatever a client sent must not crash the server).

    Gradients are read without a copy (views of the reply's bytes).
    """
    try:
        if GRADS not in content.array_records or METRICS not in content.metric_records:
            return f"the reply lacks its '{GRADS}' ArrayRecord or its '{METRICS}' MetricRecord"
        return ReplyRecords(
            grads=record_tensors(content[GRADS], copy=False),
            buffers=record_tensors(content[BUFFERS]) if BUFFERS in content.array_records else None,
            velocity=record_tensors(content[VELOCITY], copy=False) if VELOCITY in content.array_records else {},
            metrics=dict(content[METRICS]),
            info={k: str(v)[:64] for k, v in content[INFO].items()} if INFO in content.config_records else {},
        )
    except Exception as err:  # noqa: BLE001 - a malformed record is a failed client, not a server crash
        return f"unreadable reply ({type(err).__name__}: {err})"
