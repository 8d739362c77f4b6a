"""The server's state between rounds, as one value: what a checkpoint holds.

``plan_round`` and ``server_step`` (strategies/server_step.py) take a ``ServerState`` and return
the next one; the Flower strategy (strategies/large_batch.py) only keeps the latest, and
server_app/results.py saves ``to_dict()`` as checkpoint.pt and reads it back with ``from_dict``.
Everything a resumed run needs to continue bit for bit is here: the model, the optimizer's
velocity, the teacher's ``state_dict``, the client sampler's generator, every partition's
sampler position, the norm guard's memory, the batch policy's and the DP accountant's history, and
the tail average of ``average-from`` and the clients ``exclude-ratio`` excluded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from strategies.batch_policy import PolicyMemory
from strategies.persistence import Persistence


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries from one round to the next.

    A value: the functions that advance it return a new ``ServerState`` and change neither the
    old one nor its tensors, so a state can be kept, compared or saved at any point. Read its
    tensors; never write them.
    """

    model: OrderedDict[str, torch.Tensor]  # the global model's parameters and buffers, state_dict order, on the CPU
    velocity: list[torch.Tensor] | None = None  # the server optimizer's momentum buffer, in parameter order
    teacher: Mapping[str, Any] = field(default_factory=dict)  # the teacher's state_dict
    rng: Mapping[str, Any] = field(default_factory=dict)  # the client sampler: numpy bit-generator state
    samples_seen: int = 0  # examples drawn so far, over clients and local steps
    virtual_total: float = 0.0  # seconds of the virtual clock (device profiles applied)
    drawn: Mapping[int, int] = field(default_factory=dict)  # partition id -> examples its sampler has drawn so far
    norm_history: tuple[float, ...] = ()  # the largest accepted |g_i| of each of the last NORM_WINDOW rounds
    policy: PolicyMemory = field(default_factory=PolicyMemory)  # what an adaptive batch policy probed and chose
    round: int = 0  # rounds completed
    client_momentum: Mapping[int, list[torch.Tensor]] = field(default_factory=dict)  # centered-clip: partition -> m_i
    failed_rounds: int = 0  # consecutive rounds skipped for too few valid replies (max-failed-rounds)
    dp_noise_multiplier: float | None = None  # client-level DP: the run's z, fixed in round 1 (None: not yet, or off)
    dp_history: tuple[tuple[float, float, int], ...] = ()  # DP: Opacus' (z, q, steps) entries so far
    dp_noise_seed: int | None = None  # DP: the noise generator's seed, fixed in round 1 (a secret by default)
    average: OrderedDict[str, torch.Tensor] | None = None  # average-from: the tail mean of the global models
    averaged: int = 0  # average-from: the global models in ``average``
    persistence: Persistence = field(default_factory=Persistence)  # exclude-ratio: offsets summed, clients excluded

    @classmethod
    def initial(cls, model: Mapping[str, torch.Tensor], seed: int, teacher: Mapping[str, Any]) -> ServerState:
        """The state before round 1: a CPU copy of ``model`` (a ``state_dict``) and the teacher's ``state_dict``."""
        return cls(model=OrderedDict((k, v.detach().clone().cpu()) for k, v in model.items()), teacher=teacher,
                   rng=np.random.default_rng(seed).bit_generator.state)

    def sampler(self) -> np.random.Generator:
        """A generator that continues the client sampler where this state left it."""
        rng = np.random.default_rng()
        rng.bit_generator.state = self.rng
        return rng

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tensors, numbers, lists, dicts) for ``torch.save``; ``from_dict`` inverts it."""
        return {
            "model": OrderedDict(self.model), "velocity": None if self.velocity is None else list(self.velocity),
            "teacher": self.teacher, "rng": self.rng, "samples_seen": self.samples_seen,
            "virtual_total": self.virtual_total, "drawn": dict(self.drawn), "norm_history": list(self.norm_history),
            "policy": self.policy.to_dict(), "round": self.round,
            "client_momentum": {int(k): list(v) for k, v in self.client_momentum.items()},
            "failed_rounds": self.failed_rounds, "dp_noise_multiplier": self.dp_noise_multiplier,
            "dp_history": [list(step) for step in self.dp_history], "dp_noise_seed": self.dp_noise_seed,
            "average": None if self.average is None else OrderedDict(self.average), "averaged": self.averaged,
            "persistence": self.persistence.to_dict(),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> ServerState:
        """The state ``to_dict`` returned (also of a checkpoint written before ``norm_history`` existed)."""
        return cls(
            model=OrderedDict(state["model"].items()),
            velocity=None if state["velocity"] is None else list(state["velocity"]),
            teacher=state["teacher"], rng=state["rng"], samples_seen=int(state["samples_seen"]),
            virtual_total=float(state["virtual_total"]), drawn={int(k): int(v) for k, v in state["drawn"].items()},
            norm_history=tuple(float(n) for n in state.get("norm_history", [])),
            policy=PolicyMemory.from_dict(state["policy"]), round=int(state["round"]),
            client_momentum={int(k): list(v) for k, v in state.get("client_momentum", {}).items()},
            failed_rounds=int(state.get("failed_rounds", 0)),
            dp_noise_multiplier=_optional(float, state.get("dp_noise_multiplier")),
            dp_history=tuple((float(z), float(q), int(n)) for z, q, n in state.get("dp_history", [])),
            dp_noise_seed=_optional(int, state.get("dp_noise_seed")),
            average=_optional(OrderedDict, state.get("average")), averaged=int(state.get("averaged", 0)),
            persistence=Persistence.from_dict(state.get("persistence")),
        )


def _optional(kind: type, value: Any) -> Any:
    """``kind(value)``, or None for None (a field a checkpoint may not have)."""
    return None if value is None else kind(value)
