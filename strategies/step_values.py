"""The values of a round: its setup, plan, replies, checked replies, record and errors.

strategies/server_step.py holds the functions over them (``plan_round``, ``server_step``,
``skip_round``); docs/architecture.md shows how they fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from strategies.robust import Aggregator
from strategies.round_plan import RoundPlan
from strategies.teachers import Teacher
from workloads.config import RunConfig
from workloads.devices import DeviceProfile, parse_profiles


@dataclass(frozen=True)
class RunSetup:
    """What stays fixed for the whole run: the config, the model's layout, the teacher, the device profiles."""

    cfg: RunConfig
    param_names: tuple[str, ...]  # trainable parameters, in ``model.parameters()`` order
    param_shapes: Mapping[str, tuple[int, ...]]
    buffer_names: tuple[str, ...]  # the model's other tensors (BatchNorm statistics)
    teacher: Teacher  # its state is ``ServerState.teacher``
    profiles: tuple[DeviceProfile, ...]
    model_bytes: int
    aggregator: Aggregator = Aggregator()

    @classmethod
    def create(cls, cfg: RunConfig, model: Mapping[str, torch.Tensor], param_names: Sequence[str],
               teacher: Teacher) -> RunSetup:
        """The setup of a run of ``model`` (a ``state_dict``) whose trainable tensors are ``param_names``."""
        names = tuple(param_names)
        return cls(cfg, names, {n: tuple(model[n].shape) for n in names}, tuple(k for k in model if k not in set(names)),
                   teacher, parse_profiles(cfg.device_profiles),
                   sum(v.numel() * v.element_size() for v in model.values()), Aggregator.from_config(cfg))


@dataclass(frozen=True)
class StepPlan:
    """One round as it was sent: what ``server_step`` checks the replies against, and applies."""

    setup: RunSetup
    round: int  # 1-based, over the whole run (a resumed run continues the count)
    assigned: Mapping[int, tuple[int, int]]  # node id -> (partition id, b_i); a partition below 0 is not known yet
    lr: float  # the round's learning rate before the teacher's lr_scale
    local_steps: int  # H
    teacher_plan: RoundPlan = RoundPlan()
    sent_at: float = math.nan  # time.perf_counter() when the messages went out (round_trip_s)
    sample_rate: float = 1.0  # q = K / N: the round's clients over the usable ones (DP accounting)

    @property
    def planned(self) -> int:
        """B, the examples the round asked for."""
        return sum(b for _, b in self.assigned.values())

    @property
    def momentum(self) -> float:
        """The server optimizer's momentum this round (0 when the clients ran it: ``local_momentum``)."""
        tp = self.teacher_plan
        if tp.local_momentum or self.setup.aggregator.name == "centered-clip":  # (then in each client's m_i)
            return 0.0
        return self.setup.cfg.momentum if tp.server_momentum is None else tp.server_momentum

    @property
    def weight_decay(self) -> float:
        """The server optimizer's weight decay this round (0 when the clients or their momenta hold it)."""
        if self.teacher_plan.local_momentum or self.setup.aggregator.name == "centered-clip":
            return 0.0
        return self.setup.cfg.weight_decay


@dataclass(frozen=True)
class ClientReply:
    """One train reply as read from its message, not checked yet. Tensors are read only (views of the reply)."""

    node_id: int
    partition_id: int = -1  # as the node directory knows it (below 0: not known)
    grads: Mapping[str, torch.Tensor] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    buffers: Mapping[str, torch.Tensor] | None = None
    velocity: Mapping[str, torch.Tensor] = field(default_factory=dict)  # the client's final velocity, if sent
    info: Mapping[str, str] = field(default_factory=dict)  # where it ran (host, pid, Ray node), as the client says
    error: str | None = None  # why it cannot be used as sent: the client's error, an unreadable reply, ...


@dataclass
class ValidReply:
    """A reply that passed every check."""

    node_id: int
    partition_id: int
    batch: int  # b_i, examples
    grads: list[torch.Tensor]  # in param_names order; views of the reply's bytes: read them, never write
    buffers: Mapping[str, torch.Tensor] | None
    metrics: dict[str, float]
    norm: float  # |g_i|
    info: Mapping[str, str]  # for clients.csv only
    velocity: list[torch.Tensor] | None = None  # the client's final velocity (RoundPlan.local_momentum); read only


@dataclass(frozen=True)
class ReplyCheck:
    """The round's replies, checked."""

    valid: list[ValidReply]  # ordered by partition id
    failures: list[dict[str, Any]]  # failures.csv rows, ordered by partition and node id
    missing: list[int]  # sampled nodes that sent no reply


@dataclass(frozen=True)
class StepRecord:
    """What a round leaves besides the next state."""

    row: dict[str, Any]  # rounds.csv (the ServerApp adds the evaluation)
    clients: list[dict[str, Any]]  # clients.csv, one row per valid reply
    check: ReplyCheck


class StepError(RuntimeError):
    """A round that changed nothing; ``check`` holds its checked replies (None if not checked)."""

    def __init__(self, message: str, check: ReplyCheck | None = None) -> None:
        super().__init__(message)
        self.check = check


class RoundFailure(StepError):
    """Too few valid replies: the round's examples fall below ``min-batch-fraction`` of the plan."""


def refused_by_config(reason: str) -> bool:
    """Whether a client's error reply is a ``ConfigError`` (its settings: retrying or skipping cannot help).

    Flower's runtimes write the exception's type into the error's reason.
    """
    return "ConfigError" in reason


class DivergenceError(StepError):
    """The server step would have made the global model non-finite; it was not applied."""
