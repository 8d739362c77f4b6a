"""The registry of teachers, selected by the run-config key ``teacher``."""

from __future__ import annotations

from collections.abc import Callable

from strategies.gradient_noise import AdaScaleTeacher, NoiseTeacher
from strategies.teachers import IdentityTeacher, LarsTeacher, ScalingTeacher, StepTeacher, TeacherInput, TeacherOutput
from workloads.config import RunConfig

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


def build_teacher(cfg: RunConfig) -> Teacher:
    """Construct the teacher named by the run-config key ``teacher``."""
    return TEACHERS[cfg.teacher](cfg)
