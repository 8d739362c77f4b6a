"""The registry of teachers, selected by the run-config key ``teacher``."""

from __future__ import annotations

from collections.abc import Callable

from strategies.gradient_noise import AdaScaleTeacher, NoiseTeacher
from strategies.teachers import (
    IdentityTeacher, LarsTeacher, ScalingTeacher, StepTeacher, TeacherInput, TeacherOutput, parse_steps,
)
from workloads.config import RunConfig
from workloads.errors import ConfigError

Teacher = Callable[[TeacherInput], TeacherOutput]

TEACHERS: dict[str, Callable[[RunConfig], Teacher]] = {
    "none": lambda cfg: IdentityTeacher(),
    "step": lambda cfg: StepTeacher(cfg.teacher_steps, cfg.num_server_rounds),
    "noise": lambda cfg: NoiseTeacher(cfg.teacher_small_batch, cfg.seed),
    "adascale": lambda cfg: AdaScaleTeacher(cfg),
    "linear": lambda cfg: ScalingTeacher(cfg.teacher_small_batch, 1.0, "linear"),
    "sqrt": lambda cfg: ScalingTeacher(cfg.teacher_small_batch, 0.5, "sqrt"),
    "lars": lambda cfg: LarsTeacher(),
}


def check_teacher(cfg: RunConfig) -> None:
    """Raise ConfigError for an unknown ``teacher`` or a malformed ``teacher-steps``."""
    if cfg.teacher not in TEACHERS:
        raise ConfigError(
            f"run-config key 'teacher' = {cfg.teacher!r} is not allowed. Allowed: {', '.join(TEACHERS)}."
        )
    parse_steps(cfg.teacher_steps, cfg.num_server_rounds)


def build_teacher(cfg: RunConfig) -> Teacher:
    """Construct the teacher named by the run-config key ``teacher``."""
    return TEACHERS[cfg.teacher](cfg)


def teacher_state(teacher: Teacher) -> dict:
    """A teacher's checkpointable state (``{}`` for stateless teachers)."""
    return teacher.state_dict() if hasattr(teacher, "state_dict") else {}


def load_teacher_state(teacher: Teacher, state: dict) -> None:
    """Restore a teacher from ``teacher_state``'s output."""
    if hasattr(teacher, "load_state_dict"):
        teacher.load_state_dict(state)
