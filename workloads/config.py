"""The run configuration, parsed once into a typed, validated dataclass.

Flower hands the ServerApp and the ClientApp a flat ``run_config`` dict with kebab-case keys
(``[tool.flwr.app.config]`` in ``pyproject.toml`` fused with ``--run-config`` overrides).
``RunConfig.from_mapping`` turns it into a frozen dataclass and rejects unknown keys, wrong
types and out-of-range values with a message that names the key, the value and what is
allowed. Nothing below the apps receives a ``Context``.

This module is a leaf: it imports nothing of the project but ``workloads.errors``. Names that
registries own (datasets, models, teachers, device profiles) are checked by those registries,
all at once by ``server_app.preflight.parse_run_config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from workloads.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear")
PARTITIONERS = ("iid", "dirichlet")
DEVICES = ("auto", "cpu", "cuda")
BATCH_POLICIES = ("fixed", "memory-max", "optimal")


@dataclass(frozen=True)
class RunConfig:
    """Typed run configuration; field ``foo_bar`` is run-config key ``foo-bar``."""

    dataset: str = "digits"  # workload name, see workloads.registry.WORKLOADS
    data_dir: str = ""  # folder with <dataset>/*.npz; "" = $FLB_DATA_DIR, then download
    model: str = "auto"  # "auto" = the workload's default model
    partitioner: str = "iid"  # "iid" or "dirichlet" (over labels)
    dirichlet_alpha: float = 0.5  # concentration of the Dirichlet label split
    val_fraction: float = 0.1  # share of the training split held out for validation
    train_limit: int = 0  # keep this many training examples (fixed random subset); 0 = all
    num_server_rounds: int = 60  # rounds = global steps (with local-steps=1)
    clients_per_round: int = 0  # K clients sampled per round; 0 = every connected node
    virtual_clients: int = 0  # simulation: V clients packed onto the Flower nodes (strategies/packing.py); 0 = one per node
    client_threads: int = 0  # virtual clients on a CPU: clients of a bundle computed at once (one core each); 0 = the process's CPUs
    global_batch_size: int = 256  # B = sum of the local batches b_i, in examples
    micro_batch_size: int = 0  # examples per forward/backward on a client; 0 = b_i
    local_steps: int = 1  # H; 1 = gradient of the global batch, >1 = FedAvg-style
    lr: float = 0.3  # peak server learning rate per global step
    momentum: float = 0.9  # server SGD momentum
    weight_decay: float = 5e-4  # L2 coefficient added to the gradient on the server
    warmup_rounds: int = 2  # linear warm-up from lr/warmup to lr over this many rounds
    schedule: str = "cosine"  # decay after warm-up: constant, cosine or linear
    eval_every: int = 5  # central evaluation every this many rounds (and the last)
    seed: int = 0  # seeds partitioning, client sampling, shuffles and model init
    out_dir: str = ""  # results folder; "" = ./results/<timestamp>
    teacher: str = "none"  # gradient teacher, see strategies/teacher_registry.py
    teacher_steps: str = "0:4.0,0.33:2.0,0.66:1.0"  # step teacher: start:multiplier, ...
    teacher_small_batch: int = 64  # b_s: the small batch a teacher targets (noise, lr scaling)
    teacher_ema: float = 0.9  # adascale: EMA decay of the noise statistics per round
    teacher_switch: float = 0.5  # post-local: rounds of the large-batch phase (a fraction of num-server-rounds below 1, else a count)
    teacher_local_steps: int = 16  # post-local: local steps H per round after the switch; swap: steps of the last round
    teacher_hyper_lr: float = 0.05  # learned: step of the per-tensor log-gains per round (normalised hypergradient)
    teacher_val_batch: int = 64  # learned: validation examples per hypergradient (validation split only)
    augment: bool = True  # random crop + flip on training batches (CIFAR-10 only)
    device: str = "auto"  # "auto" = cuda when available, else cpu
    device_profiles: str = ""  # simulated devices: name:memory_mb[:speed[:mbps[:ms]]], ...
    memory_budget_mb: float = 0.0  # client memory budget when no profile/node config; 0 = none
    memory_margin: float = 0.1  # share of a budget held back from the estimator's prediction
    memory_check_every: int = 0  # CPU clients measure the step's peak (profiled replay): 0 = first and last round, N = also every N-th, -1 = never
    batch_policy: str = "fixed"  # fixed (global-batch-size, even split), memory-max, optimal
    batch_objective: str = "time"  # optimal: least time to a target, or least compute cost ("cost")
    calibration_rounds: int = 2  # optimal: rounds at global-batch-size that measure the noise scale
    min_batch_fraction: float = 1.0  # a round needs valid replies covering this share of the planned batch
    round_timeout_s: float = 600.0  # seconds a round waits for replies; later ones count as failures
    max_norm_ratio: float = 50.0  # reject |g_i| above this times the largest other / recent |g_j| (docs/faults.md); 0 = off
    checkpoint_every: int = 10  # write checkpoint.pt every this many rounds (and at the end); 0 = at the end
    resume: bool = False  # continue the run in out-dir from its checkpoint.pt

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Return the run-config keys in kebab case."""
        return tuple(f.name.replace("_", "-") for f in fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Return the defaults as a kebab-case dict (the pyproject table)."""
        return {f.name.replace("_", "-"): f.default for f in fields(cls)}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> RunConfig:
        """Parse and validate a kebab-case run-config mapping.

        Missing keys take their defaults, so ``run_simulation`` (which passes an empty
        ``run_config``) works too.

        Raises
        ------
        ConfigError
            On an unknown key, a value of the wrong type or a value out of range.
        """
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in mapping.items():
            if key not in known:
                hint = difflib.get_close_matches(key, list(known), n=1)
                extra = f" Did you mean '{hint[0]}'?" if hint else ""
                raise ConfigError(
                    f"run-config key '{key}' is unknown.{extra} "
                    f"Allowed keys: {', '.join(known)}."
                )
            values[known[key].name] = _coerce(key, value, type(known[key].default))
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_mapping(self) -> dict[str, Any]:
        """Return the config as a kebab-case dict (what ``config.json`` holds)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        """Return a validated copy with some fields changed (snake-case names)."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check ranges and names; raise ConfigError naming key, value and what is allowed."""
        _choice("partitioner", self.partitioner, PARTITIONERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("batch-policy", self.batch_policy, BATCH_POLICIES)
        if self.memory_check_every < -1:
            raise ConfigError(f"run-config key 'memory-check-every' = {self.memory_check_every}: must be >= -1 "
                              "(-1 never, 0 the first and last round, N also every N-th).")
        _choice("batch-objective", self.batch_objective, ("time", "cost"))
        _positive("calibration-rounds", self.calibration_rounds)
        _positive("dirichlet-alpha", self.dirichlet_alpha)
        _positive("num-server-rounds", self.num_server_rounds)
        _positive("clients-per-round", self.clients_per_round, allow_zero=True)
        _positive("virtual-clients", self.virtual_clients, allow_zero=True)
        _positive("client-threads", self.client_threads, allow_zero=True)
        if self.virtual_clients and self.clients_per_round > self.virtual_clients:
            raise ConfigError(
                f"run-config key 'clients-per-round' = {self.clients_per_round}: more than virtual-clients = "
                f"{self.virtual_clients}. Allowed: 0 (all) or 1..{self.virtual_clients}."
            )
        _positive("global-batch-size", self.global_batch_size)
        _positive("micro-batch-size", self.micro_batch_size, allow_zero=True)
        _positive("local-steps", self.local_steps)
        _positive("lr", self.lr)
        _positive("weight-decay", self.weight_decay, allow_zero=True)
        _positive("warmup-rounds", self.warmup_rounds, allow_zero=True)
        _positive("eval-every", self.eval_every)
        _positive("seed", self.seed, allow_zero=True)
        _positive("train-limit", self.train_limit, allow_zero=True)
        _positive("teacher-small-batch", self.teacher_small_batch)
        _positive("teacher-local-steps", self.teacher_local_steps)
        _positive("teacher-hyper-lr", self.teacher_hyper_lr, allow_zero=True)
        _positive("teacher-val-batch", self.teacher_val_batch)
        if not (0.0 < self.teacher_switch < 1.0 or (self.teacher_switch >= 1 and float(self.teacher_switch).is_integer())):
            raise ConfigError(
                f"run-config key 'teacher-switch' = {self.teacher_switch!r}: must be a fraction of num-server-rounds "
                "in (0, 1) or a whole number of rounds >= 1."
            )
        _positive("memory-budget-mb", self.memory_budget_mb, allow_zero=True)
        if not 0.0 <= self.memory_margin < 1.0:
            raise ConfigError(f"run-config key 'memory-margin' = {self.memory_margin!r}: must be in [0, 1).")
        if not 0.0 <= self.teacher_ema < 1.0:
            raise ConfigError(f"run-config key 'teacher-ema' = {self.teacher_ema!r}: must be in [0, 1).")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"run-config key 'momentum' = {self.momentum!r}: must be in [0, 1).")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(
                f"run-config key 'val-fraction' = {self.val_fraction!r}: must be in (0, 0.5)."
            )
        if not 0.0 < self.min_batch_fraction <= 1.0:
            raise ConfigError(
                f"run-config key 'min-batch-fraction' = {self.min_batch_fraction!r}: must be in (0, 1] "
                "(1 = every sampled client must deliver a valid gradient)."
            )
        _positive("round-timeout-s", self.round_timeout_s)
        if self.max_norm_ratio != 0 and self.max_norm_ratio <= 1:
            raise ConfigError(
                f"run-config key 'max-norm-ratio' = {self.max_norm_ratio!r}: must be 0 (guard off) or > 1."
            )
        _positive("checkpoint-every", self.checkpoint_every, allow_zero=True)
        if self.micro_batch_size > self.global_batch_size:
            raise ConfigError(
                f"run-config key 'micro-batch-size' = {self.micro_batch_size}: larger than global-batch-size = "
                f"{self.global_batch_size}. Allowed: 0 (whole local batch) or 1..{self.global_batch_size}."
            )
        if self.clients_per_round and self.global_batch_size < self.clients_per_round:
            raise ConfigError(
                f"run-config key 'global-batch-size' = {self.global_batch_size}: must be at "
                f"least clients-per-round = {self.clients_per_round} (one example per client)."
            )


def split_global_batch(global_batch: int, num_clients: int) -> list[int]:
    """Split a global batch B into K local batches b_i that differ by at most one.

    Parameters
    ----------
    global_batch : int
        B, examples per global step.
    num_clients : int
        K, clients in the round.

    Returns
    -------
    list[int]
        b_1..b_K with sum B; the first ``B mod K`` clients get one extra example.
    """
    if num_clients < 1 or global_batch < num_clients:
        raise ConfigError(
            f"run-config key 'global-batch-size' = {global_batch}: must be at least the "
            f"number of clients in the round ({num_clients})."
        )
    base, extra = divmod(global_batch, num_clients)
    return [base + (1 if i < extra else 0) for i in range(num_clients)]


def check_batches_fit(local_batches: list[int], partition_sizes: list[int]) -> None:
    """Raise ConfigError when the largest local batch exceeds the smallest partition."""
    largest, smallest = max(local_batches), min(partition_sizes)
    if largest > smallest:
        raise ConfigError(
            f"run-config key 'global-batch-size' = {sum(local_batches)}: a local batch of {largest} examples is "
            f"larger than the smallest client partition ({smallest} examples; sizes "
            f"{sorted(partition_sizes)[:8]}...). Allowed: global-batch-size <= "
            f"{smallest * len(local_batches)} for {len(local_batches)} clients, or more "
            "data per client (fewer supernodes, a larger dirichlet-alpha)."
        )


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert a TOML-typed value to the field's type or raise ConfigError."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(
        f"run-config key '{key}' = {value!r} has the wrong type: expected {kind.__name__}."
    )


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"run-config key '{key}' = {value!r} is not allowed. Allowed: {', '.join(allowed)}."
        )


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"run-config key '{key}' = {value!r}: must be {bound}.")
