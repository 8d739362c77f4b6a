"""Teachers: map the large-global-batch gradient toward its small-batch equivalent.

Tyagi (arXiv 2509.10537) proposes a teacher that rescales the gradient of a large global
batch so that training keeps the generalisation of small batches; the paper evaluates only a
step-function stand-in. The strategy calls the teacher once per round, after aggregation and
before the server optimizer, with a ``TeacherInput``; it applies the returned gradient with
the scheduled learning rate times ``lr_scale`` and logs ``metrics`` as ``teacher_<name>``
columns of rounds.csv. Every teacher is a ``Teacher``: besides the call it may set the next
round's local steps, server momentum, learning rate and per-client gradient multipliers through
``plan(server_round, batches) -> RoundPlan``, and whatever it carries from round to round is
its ``state_dict``, which the server keeps in its ``ServerState`` (strategies/server_state.py):
the server step loads it into the teacher before each use and reads it back after, so a
teacher's state outside ``state_dict`` does not survive a round (or a checkpoint).

This module holds the interface and the teachers that need no noise statistics:

- ``none``: identity.
- ``step``: the paper's stand-in, a piecewise-constant multiplier on G over rounds.
- ``linear``: Goyal et al. 2017 linear LR scaling, lr * B / b_s (with the schedule's warm-up).
- ``sqrt``: Hoffer et al. 2017 square-root scaling, lr * sqrt(B / b_s).
- ``lars``: You et al. 2017 layer-wise trust ratios.

``noise`` and ``adascale`` are in strategies/gradient_noise.py, ``post-local`` and ``swap`` in
strategies/local_phase.py, ``signed-noise`` in strategies/signed_noise.py, ``learned`` in
strategies/learned_teacher.py; the registry is in strategies/teacher_registry.py.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from strategies.noise_scale import NoiseStats
from strategies.round_plan import RoundPlan
from workloads.errors import ConfigError

LARS_TRUST = 1e-3  # eta in You et al. 2017; only its product with lr matters, lr is tuned


@dataclass(frozen=True)
class TeacherInput:
    """What the strategy hands a teacher each round. Teachers must not modify the tensors."""

    grad: list[torch.Tensor]  # G, per parameter tensor
    client_grads: Sequence[Sequence[torch.Tensor]]  # g_i, per client, per parameter tensor
    client_batches: Sequence[int]  # b_i, examples
    server_round: int
    lr: float = 0.0  # the round's scheduled learning rate
    params: Sequence[torch.Tensor] = ()  # current global parameters w (before the step)
    weight_decay: float = 0.0  # the server optimizer's L2 coefficient
    stats: NoiseStats | None = None  # tr(Sigma), |mu|^2, B_simple of this round


@dataclass
class TeacherOutput:
    """What a teacher returns: the gradient to apply, an LR multiplier and metrics."""

    grad: list[torch.Tensor]
    lr_scale: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)


class Teacher(ABC):
    """The interface the server calls: ``plan`` before a round, the call after aggregation, and the state.

    The defaults are those of a stateless teacher that changes nothing in the round's plan.
    """

    name: str = ""

    def plan(self, server_round: int, batches: Mapping[int, int]) -> RoundPlan:
        """The round's ``RoundPlan``; ``batches`` maps its partition ids to b_i (default: the run config's round)."""
        return RoundPlan()

    @abstractmethod
    def __call__(self, inp: TeacherInput) -> TeacherOutput:
        """The gradient the server optimizer applies, an LR multiplier and metrics."""

    def state_dict(self) -> dict:
        """What the teacher carries to the next round (``{}``: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""


class SeededTeacher(Teacher):
    """A teacher that draws from its own torch generator, whose state is its ``state_dict``."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        """The generator's state (a checkpoint restores the same future draws)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.generator.set_state(state["generator"])


class IdentityTeacher(Teacher):
    """``teacher = "none"``: apply the large-batch gradient unchanged."""

    name = "none"

    def __call__(self, inp: TeacherInput) -> TeacherOutput:
        """Return G as is."""
        return TeacherOutput(grad=inp.grad, metrics={"scale": 1.0})


def parse_steps(text: str, num_rounds: int, key: str = "teacher-steps") -> list[tuple[int, float]]:
    """Parse ``teacher-steps`` (or another run-config ``key`` of this format, e.g. ``batch-steps``).

    Returns ``[(first_round_index, multiplier), ...]``.

    Entries are ``start:multiplier`` separated by commas. ``start`` is a number of completed
    rounds (an integer >= 1, or 0) or, when below 1, a fraction of ``num-server-rounds``:
    ``"0:4,0.33:2,0.66:1"`` is 4x for the first third of training, 2x, then 1x.

    Raises
    ------
    ConfigError
        On a malformed entry, a first start other than 0, unsorted starts or a multiplier <= 0.
    """
    out = []
    try:
        for item in text.split(","):
            start_s, mult_s = item.split(":")
            start, mult = float(start_s), float(mult_s)
            out.append((int(round(start * num_rounds)) if start < 1 else int(start), mult))
    except ValueError:
        out = []
    starts = [s for s, _ in out]
    if not out or starts[0] != 0 or starts != sorted(starts) or min(m for _, m in out) <= 0:
        raise ConfigError(
            f"run-config key '{key}' = {text!r}: expected comma-separated start:multiplier "
            "entries, starts ascending from 0 (rounds, or fractions of num-server-rounds below 1), "
            "multipliers > 0, e.g. \"0:4.0,300:2.0,600:1.0\"."
        )
    return out


class StepTeacher(Teacher):
    """``teacher = "step"``: multiply G by a piecewise-constant factor over rounds."""

    name = "step"

    def __init__(self, steps: str, num_rounds: int) -> None:
        self.steps = parse_steps(steps, num_rounds)

    def multiplier(self, server_round: int) -> float:
        """Factor for round ``server_round`` (1-based; start s applies after s completed rounds)."""
        return [m for start, m in self.steps if start <= server_round - 1][-1]

    def __call__(self, inp: TeacherInput) -> TeacherOutput:
        """Return m(round) * G."""
        m = self.multiplier(inp.server_round)
        return TeacherOutput([g * m for g in inp.grad], metrics={"scale": m})


class ScalingTeacher(Teacher):
    """``linear`` / ``sqrt``: scale the learning rate by (B / b_s) or sqrt(B / b_s).

    ``lr`` in the run config is then the small-batch learning rate for b_s examples.
    """

    def __init__(self, small_batch: int, power: float, name: str) -> None:
        self.small_batch, self.power, self.name = small_batch, power, name

    def __call__(self, inp: TeacherInput) -> TeacherOutput:
        """Return G with an LR multiplier of (B / b_s) ** power."""
        factor = (sum(inp.client_batches) / self.small_batch) ** self.power
        return TeacherOutput(inp.grad, lr_scale=factor, metrics={"scale": factor})


class LarsTeacher(Teacher):
    """``teacher = "lars"``: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017).

    For every weight tensor w (ndim > 1; biases and norm parameters are left alone, as is
    usual) with gradient g, trust = eta * |w| / (|g| + lambda |w|), and the applied update
    direction is trust * (g + lambda w). The server optimizer adds lambda * w itself, so the
    teacher returns trust * (g + lambda w) - lambda w.
    """

    name = "lars"

    def __call__(self, inp: TeacherInput) -> TeacherOutput:
        """Return the trust-ratio-scaled gradient."""
        wd, out, ratios = inp.weight_decay, [], []
        for g, w in zip(inp.grad, inp.params):
            if w.ndim <= 1:
                out.append(g)
                continue
            w_norm, g_norm = float(w.norm()), float(g.norm())
            trust = LARS_TRUST * w_norm / (g_norm + wd * w_norm) if w_norm > 0 and g_norm > 0 else 1.0
            ratios.append(trust)
            out.append(g.mul(trust).add_(w, alpha=wd * (trust - 1.0)))
        mean = math.fsum(ratios) / len(ratios) if ratios else 1.0
        return TeacherOutput(out, metrics={"scale": mean})
