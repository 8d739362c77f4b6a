"""Teachers: map the large-global-batch gradient toward its small-batch equivalent.

Tyagi (arXiv 2509.10537) proposes a teacher that rescales the gradient of a large global
batch so that training keeps the generalisation of small batches. The strategy calls the
teacher once per round, after aggregation and before the server optimizer, with

- ``grad``: the aggregated gradient G of the global batch B = sum_i b_i;
- ``client_grads`` and ``client_batches``: each client's gradient g_i and batch size b_i;
- ``server_round``;

and applies the returned gradient with the learning rate multiplied by ``lr_scale``.
A teacher keeps whatever state it needs on itself. ``metrics`` become columns of rounds.csv.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from workloads.config import RunConfig


@dataclass(frozen=True)
class TeacherInput:
    """What the strategy hands a teacher each round."""

    grad: list[torch.Tensor]  # G, per parameter tensor
    client_grads: Sequence[Sequence[torch.Tensor]]  # g_i, per client, per parameter tensor
    client_batches: Sequence[int]  # b_i, examples
    server_round: int


@dataclass
class TeacherOutput:
    """What a teacher returns: the gradient to apply, an LR multiplier and metrics."""

    grad: list[torch.Tensor]
    lr_scale: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)


class IdentityTeacher:
    """``teacher = "none"``: apply the large-batch gradient unchanged."""

    name = "none"

    def __call__(self, inp: TeacherInput) -> TeacherOutput:
        """Return G as is, with an LR multiplier of 1."""
        return TeacherOutput(grad=inp.grad)


TeacherFactory = Callable[[RunConfig], Callable[[TeacherInput], TeacherOutput]]

TEACHERS: dict[str, TeacherFactory] = {
    "none": lambda cfg: IdentityTeacher(),
}


def build_teacher(cfg: RunConfig) -> Callable[[TeacherInput], TeacherOutput]:
    """Construct the teacher named by the run-config key ``teacher``."""
    return TEACHERS[cfg.teacher](cfg)
