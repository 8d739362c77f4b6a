"""The registry of teachers, selected by the run-config key ``teacher``."""

from __future__ import annotations

from collections.abc import Callable

from strategies.gradient_noise import AdaScaleTeacher, NoiseTeacher
from strategies.learned_teacher import LearnedTeacher
from strategies.local_phase import LOCAL_TEACHERS, LocalPhaseTeacher, local_until, switch_round
from strategies.signed_noise import SignedNoiseTeacher
from strategies.teachers import IdentityTeacher, LarsTeacher, ScalingTeacher, StepTeacher, Teacher, parse_steps
from workloads.config import RunConfig
from workloads.errors import ConfigError

TEACHERS: dict[str, Callable[[RunConfig], Teacher]] = {
    "none": lambda cfg: IdentityTeacher(),
    "step": lambda cfg: StepTeacher(cfg.teacher_steps, cfg.num_server_rounds),
    "noise": lambda cfg: NoiseTeacher(cfg.teacher_small_batch, cfg.seed),
    "adascale": lambda cfg: AdaScaleTeacher(cfg),
    "linear": lambda cfg: ScalingTeacher(cfg.teacher_small_batch, 1.0, "linear"),
    "sqrt": lambda cfg: ScalingTeacher(cfg.teacher_small_batch, 0.5, "sqrt"),
    "lars": lambda cfg: LarsTeacher(),
    "post-local": lambda cfg: LocalPhaseTeacher(cfg),
    "swap": lambda cfg: LocalPhaseTeacher(cfg),
    "signed-noise": lambda cfg: SignedNoiseTeacher(cfg.teacher_small_batch, cfg.seed),
    "learned": lambda cfg: LearnedTeacher(cfg, _validation_gradient(cfg)),
}
LR_ONLY_TEACHERS = ("none", "step", "linear", "sqrt")  # the teachers a robust aggregator allows


def _validation_gradient(cfg: RunConfig):
    from workloads.validation import ValidationGradient

    return ValidationGradient(cfg, cfg.teacher_val_batch)


def check_teacher(cfg: RunConfig) -> None:
    """Raise ConfigError for an unknown ``teacher``, a malformed ``teacher-steps``, or a teacher's bad setting."""
    if cfg.teacher not in TEACHERS:
        raise ConfigError(
            f"run-config key 'teacher' = {cfg.teacher!r} is not allowed. Allowed: {', '.join(TEACHERS)}."
        )
    parse_steps(cfg.teacher_steps, cfg.num_server_rounds)
    if cfg.teacher in LOCAL_TEACHERS:
        local_until(cfg, switch_round(cfg))
    if cfg.aggregator != "mean" and cfg.teacher not in LR_ONLY_TEACHERS:
        raise ConfigError(
            f"run-config key 'teacher' = {cfg.teacher!r} with aggregator = {cfg.aggregator!r}: this teacher reads "
            "each client's gradient (its statistics or its multipliers), which a Byzantine client controls. "
            f"Allowed with a robust aggregator: {', '.join(LR_ONLY_TEACHERS)} (they only set the learning rate)."
        )
    if cfg.teacher == "signed-noise" and cfg.min_batch_fraction < 1.0:
        raise ConfigError(
            f"run-config key 'min-batch-fraction' = {cfg.min_batch_fraction!r}: teacher 'signed-noise' balances its "
            "multipliers over every sampled client, and a missing client would bias the noise. Allowed: 1.0."
        )


def build_teacher(cfg: RunConfig) -> Teacher:
    """Construct the teacher named by the run-config key ``teacher``."""
    return TEACHERS[cfg.teacher](cfg)

