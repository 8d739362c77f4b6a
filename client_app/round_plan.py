"""What a teacher's round plan asks of a client's step (strategies/round_plan.py on the server).

The server adds optional entries to a round's train config (``local-lrs``, ``momentum``,
``weight-decay``, ``grad-scale``) and, for a local optimizer that continues its own, a
``velocity`` ArrayRecord. Without them the round is the plain gradient step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import Message

from strategies.arrays import record_tensors


@dataclass(frozen=True)
class LocalOptimizer:
    """What a teacher's round plan asks of this client's step (strategies/round_plan.py); the default changes nothing."""

    lrs: list[float] | None = None  # one learning rate per local step
    momentum: float = 0.0  # > 0: continue the server's optimizer (momentum, weight decay) from its velocity
    weight_decay: float = 0.0
    velocity: dict[str, torch.Tensor] | None = None  # the server's velocity, by parameter name
    grad_scale: float = 1.0  # m_i, applied to the gradient before the reply
    scaled: bool = False  # the round has multipliers: the reply also carries |g_i|^2 (``grad-sq``)

    @classmethod
    def from_message(cls, msg: Message) -> LocalOptimizer:
        """Read the optional train-config entries and the ``velocity`` ArrayRecord."""
        conf = msg.content["config"]
        velocity = record_tensors(msg.content["velocity"]) if "velocity" in msg.content.array_records else None
        return cls(lrs=[float(x) for x in conf["local-lrs"]] if "local-lrs" in conf else None,
                   momentum=float(conf.get("momentum", 0.0)), weight_decay=float(conf.get("weight-decay", 0.0)),
                   velocity=velocity, grad_scale=float(conf.get("grad-scale", 1.0)), scaled="grad-scale" in conf)

    @property
    def plain(self) -> bool:
        """No local optimizer: a one-step round is the batch gradient."""
        return self.lrs is None and not self.momentum

    def velocity_for(self, model: torch.nn.Module) -> list[torch.Tensor] | None:
        """The server's velocity in ``model.parameters()`` order (None: start it at the first step)."""
        return None if self.velocity is None else [self.velocity[n] for n, _ in model.named_parameters()]
