"""Phase-switching teachers: large-batch steps first, then local SGD on the clients.

``post-local`` (Lin, Stich, Patel & Jaggi 2020, "Don't use large mini-batches, use local SGD",
arXiv 1808.07217): the first ``s`` rounds are ordinary large-batch steps; every later round
sends each client H = ``teacher-local-steps`` local steps on its own batches of b_i, and the
server averages the clients' models. Lin et al. switch at the first learning-rate decay, with
local momentum on every worker; ``teacher-switch`` sets s (a fraction of
``num-server-rounds`` below 1, else a round count; 0: every round is local, local SGD with the
server's optimizer on every client, i.e. FedAvg's rounds with local momentum).

``swap`` (Gupta, Akle Serrano & DeCoste 2020, "Stochastic Weight Averaging in Parallel",
arXiv 2001.02312): rounds 1..N-1 are large-batch steps; the last round sends every client
H = ``teacher-local-steps`` steps of independent refinement on its own data, and the server
averages the refined models. How it matches Gupta et al.: a large-batch phase, independent
refinement of copies of the model on different data orders, one final weight average. How it
differs: their phase 1 stops at a training-accuracy threshold, ours after a fixed number of
rounds; their refinement uses a batch smaller than each worker's share of the large batch and
its own learning-rate schedule, ours runs at each client's b_i (the same sequential steps as the
large batch) on the remaining part of the run's schedule; they recompute BatchNorm statistics
after averaging, ours averages the BatchNorm buffers (the benchmark's CNN has none).

Both teachers keep one clock in **steps**: round r <= s is step r, round s + i runs steps
s + (i-1) H + 1 .. s + i H, and the run has T = s + (N - s) H steps. The learning rate of every
step, on the server or a client, is the run's schedule (``lr``, ``warmup-rounds`` read as
steps, ``schedule``) at that step of T, so a switch changes who takes the steps, not the
schedule. The local steps continue the server's optimizer on each client (``RoundPlan``'s
``local_momentum``: the run's momentum and weight decay, from the server's velocity), and the
server averages weights and velocities without adding momentum of its own: with H = 1 a
local round is exactly the large-batch step, so the switch itself changes nothing.
``teacher-local-until`` u > 0 ends post-local's local phase after round u: later rounds are
large-batch steps again (the clock goes on one step a round, T = s + (u - s) H + N - u). With
``teacher-switch = 0`` that is AdaComm's shrinking communication period (Wang & Joshi 2019,
"Adaptive Communication Strategies to Achieve the Best Error-Runtime Trade-off in Local-Update
SGD"), from H steps a round to one.
``teacher-velocity = from-weights``: the clients send their weights only and the server rebuilds
the mean final velocity from them (strategies/server_opt.py ``velocity_from_weights``), exact
when each client's gradient is the same at its H steps (so for H = 1); a local round then
uploads the model once instead of twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from strategies.round_plan import RoundPlan
from strategies.server_opt import lr_at
from strategies.teachers import Teacher, TeacherInput, TeacherOutput
from workloads.config import RunConfig
from workloads.errors import ConfigError

LOCAL_TEACHERS = ("post-local", "swap")


def switch_round(cfg: RunConfig) -> int:
    """Rounds of the large-batch phase, s.

    ``post-local``: ``teacher-switch`` (a fraction of ``num-server-rounds`` below 1, else a count; 0 exactly: none);
    ``swap``: every round but the last.

    Raises
    ------
    ConfigError
        If no round would be left for the local phase, or none for the large-batch phase of post-local
        (unless ``teacher-switch`` is 0).
    """
    n = cfg.num_server_rounds
    if cfg.teacher == "swap":
        if n < 2:
            raise ConfigError(f"run-config key 'num-server-rounds' = {n}: teacher 'swap' needs at least 2 rounds "
                              "(large-batch rounds, then one refinement round).")
        return n - 1
    f = cfg.teacher_switch
    s = int(round(f * n)) if f < 1 else int(f)
    if not (1 <= s < n or f == 0):
        raise ConfigError(
            f"run-config key 'teacher-switch' = {f!r} gives {s} large-batch rounds of num-server-rounds = {n}. "
            f"Allowed: 1..{n - 1} rounds (or a fraction that gives that many), so that both phases have a round, "
            "or exactly 0 (local rounds only)."
        )
    return s


def local_until(cfg: RunConfig, switch: int) -> int:
    """The last round of the local phase, u: ``teacher-local-until`` for post-local (0: the run's last round).

    Raises
    ------
    ConfigError
        If u does not leave the local phase at least one round after the switch, or lies beyond the run.
    """
    n, u = cfg.num_server_rounds, cfg.teacher_local_until
    if cfg.teacher != "post-local" or u == 0:
        return n
    if not switch < u <= n:
        raise ConfigError(
            f"run-config key 'teacher-local-until' = {u}: the local phase would have no round (teacher-switch gives "
            f"{switch} large-batch rounds of num-server-rounds = {n}). Allowed: 0 (local to the end) or "
            f"{switch + 1}..{n}.")
    return u


class LocalPhaseTeacher(Teacher):
    """``post-local`` and ``swap``: large-batch rounds, then rounds of H local steps (module docstring)."""

    def __init__(self, cfg: RunConfig) -> None:
        if cfg.teacher not in LOCAL_TEACHERS:
            raise ValueError(f"LocalPhaseTeacher is {', '.join(LOCAL_TEACHERS)}, not {cfg.teacher!r}")
        self.name, self.cfg = cfg.teacher, cfg
        self.switch = switch_round(cfg)  # s
        self.until = local_until(cfg, self.switch)  # u
        self.local_steps = cfg.teacher_local_steps  # H
        self.total_steps = self.switch + (self.until - self.switch) * self.local_steps + cfg.num_server_rounds - self.until

    def is_local(self, server_round: int) -> bool:
        """Whether ``server_round`` is a round of H local steps (s < r <= u)."""
        return self.switch < server_round <= self.until

    def steps_of(self, server_round: int) -> range:
        """The steps (1-based, of T) that round ``server_round`` takes."""
        s, u, h = self.switch, self.until, self.local_steps
        if server_round <= s:
            return range(server_round, server_round + 1)
        if server_round > u:
            first = s + (u - s) * h + server_round - u
            return range(first, first + 1)
        first = s + (server_round - s - 1) * h + 1
        return range(first, first + h)

    def step_lr(self, step: int) -> float:
        """The schedule's learning rate at ``step`` of T."""
        c = self.cfg
        return lr_at(step, self.total_steps, c.lr, c.warmup_rounds, c.schedule)

    def plan(self, server_round: int, batches: Mapping[int, int]) -> RoundPlan:
        """One large-batch step outside the local phase; H local steps on every client in it."""
        steps = self.steps_of(server_round)
        if not self.is_local(server_round):
            return RoundPlan(local_steps=1, lr=self.step_lr(steps[0]))
        lrs = tuple(self.step_lr(t) for t in steps)
        return RoundPlan(local_steps=len(lrs), lr=math.fsum(lrs) / len(lrs), local_lrs=lrs, local_momentum=True,
                         send_velocity=self.cfg.teacher_velocity == "sent")

    def __call__(self, inp: TeacherInput) -> TeacherOutput:
        """Return G (or the mean pseudo-gradient) unchanged; the plan did the work."""
        local = self.is_local(inp.server_round)
        return TeacherOutput(inp.grad, metrics={"scale": 1.0, "local_steps": float(self.local_steps if local else 1),
                                                "phase": float(local)})
