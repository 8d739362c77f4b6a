"""The run configuration, parsed once into a typed, validated dataclass.

Flower hands the ServerApp and the ClientApp a flat ``run_config`` dict with kebab-case keys
(``[tool.flwr.app.config]`` in ``pyproject.toml`` fused with ``--run-config`` overrides).
``RunConfig.from_mapping`` turns it into a frozen dataclass and rejects unknown keys, wrong
types and out-of-range values with a message that names the key, the value and what is
allowed. Nothing below the apps receives a ``Context``.

``RunConfig`` is the one source of the keys: each field is a key (``foo_bar`` is ``foo-bar``)
with its default and a one-line doc (``_key``). ``pyproject.toml``'s table and the table of
``docs/run-config.md`` are generated from it (``python -m workloads.config_doc --write``).

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
BATCH_POLICIES = ("fixed", "memory-max", "optimal", "step", "noise")
AGGREGATORS = ("mean", "centered-clip", "median", "trimmed-mean", "krum")  # strategies/robust.py
DP_ACCOUNTANTS = ("rdp", "prv")  # Opacus' RDPAccountant, PRVAccountant (strategies/privacy.py)


def _key(default: Any, doc: str) -> Any:
    """A run-config key: its default and its one-line doc (markdown, the meaning column of docs/run-config.md)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class RunConfig:
    """Typed run configuration; field ``foo_bar`` is run-config key ``foo-bar``."""

    dataset: str = _key("digits", "`digits` (embedded), `mnist`, `cifar10`")
    data_dir: str = _key(
        "", "folder with `<dataset>/*.npz`; `\"\"` = `$FLB_DATA_DIR`, then the download cache, then a download")
    model: str = _key(
        "auto", "`auto` (digits: `mlp`, mnist: `cnn`, cifar10: `cnn`), `mlp`, `cnn`, `resnet18`, `resnet50`, `vgg11`")
    partitioner: str = _key("iid", "`iid` or `dirichlet` over labels (flwr-datasets partitioners)")
    dirichlet_alpha: float = _key(0.5, "Dirichlet concentration; smaller is more skewed")
    val_fraction: float = _key(
        0.1, "share of the training split held out for validation (fixed seed, same for every run seed)")
    train_limit: int = _key(
        0, "keep this many training examples (a fixed random subset, the same for every seed); `0` = all")
    num_server_rounds: int = _key(60, "rounds; with `local-steps=1` one round is one global step")
    clients_per_round: int = _key(0, "clients sampled per round; `0` = every connected node")
    virtual_clients: int = _key(
        0, "simulation only: `V` clients (partitions `0..V-1`) packed, each round, into one message per Flower node "
           "([running.md](running.md#virtual-clients-many-clients-on-few-flower-nodes)); `0` = one client per Flower node")
    client_threads: int = _key(
        0, "virtual clients on a CPU: clients of a bundle a process computes at once, one core each "
           "([more](#client-threads)); `0` = the process's CPUs, `1` = one after another")
    global_batch_size: int = _key(256, "`B`, split evenly over the round's clients (`b_i` differ by at most 1)")
    micro_batch_size: int = _key(0, "examples per forward/backward on a client; `0` = the whole `b_i` at once")
    local_steps: int = _key(
        1, "`1`: clients return their batch gradient; `H>1`: `H` local SGD steps, returned as `(w0 - wH)/lr`")
    lr: float = _key(0.3, "peak server learning rate per global step")
    momentum: float = _key(0.9, "server SGD momentum")
    weight_decay: float = _key(5e-4, "L2 coefficient, added to the gradient on the server")
    warmup_rounds: int = _key(2, "linear warm-up from `lr/warmup` to `lr`")
    schedule: str = _key("cosine", "after warm-up: `constant`, `cosine` or `linear` decay")
    average_from: float = _key(
        0.0, "tail averaging (SWA): after this round (a fraction of `num-server-rounds` below 1, else a round count) "
             "the global model of every later round joins a running mean, which is evaluated and saved as the run's "
             "model; clients still train the last model ([more](#average-from)); `0` = off")
    eval_every: int = _key(5, "central evaluation (validation and test) every this many rounds, and at the last")
    seed: int = _key(0, "seeds partitioning, client sampling, shuffles, augmentation and the initial model")
    out_dir: str = _key("", "results folder; `\"\"` = `./results/<time>-<dataset>-s<seed>`")
    teacher: str = _key(
        "none", "gradient teacher: `none`, `step`, `noise`, `adascale`, `linear`, `sqrt`, `lars`, `post-local`, `swap`, "
                "`signed-noise`, `learned` (see [teachers.md](teachers.md))")
    teacher_steps: str = _key(
        "0:4.0,0.33:2.0,0.66:1.0",
        "`step`: `start:multiplier` entries; a start below 1 is a fraction of `num-server-rounds`, else a round count")
    teacher_small_batch: int = _key(
        64, "`b_s`, the small batch a teacher targets: the noise of `noise`, `signed-noise` and `learned`, "
            "the reference batch of `linear`, `sqrt`, `adascale`")
    teacher_ema: float = _key(0.9, "`adascale`: per-round EMA decay of its noise statistics")
    teacher_switch: float = _key(
        0.5, "`post-local`: rounds of the large-batch phase, a fraction of `num-server-rounds` below 1, "
             "else a whole number of rounds; `0`: local rounds from the first (local SGD); the local phase needs a round")
    teacher_local_steps: int = _key(
        16, "`post-local`: local steps `H` per round after the switch; `swap`: steps of the last round "
            "(the refinement) ([more](#teacher-local-steps))")
    teacher_local_until: int = _key(
        0, "`post-local`: the last round of local steps; later rounds are large-batch steps again (AdaComm's "
           "shrinking period); `0`: local to the end")
    teacher_velocity: str = _key(
        "sent", "`post-local`, `swap`: local rounds' velocity; `sent`: every client sends its final velocity with "
                "its weights, `from-weights`: weights only, the server rebuilds the mean velocity (half the upload; "
                "[more](#teacher-velocity))")
    teacher_hyper_lr: float = _key(
        0.05, "`learned`: step of its per-tensor log-gains per round (a cosine, so unit-free); `0` keeps the gains at 1")
    teacher_val_batch: int = _key(
        64, "`learned`: validation examples per round for its hypergradient (the validation split only, at the server)")
    augment: bool = _key(True, "random crop (pad 4) and horizontal flip of training batches, CIFAR-10 only")
    device: str = _key("auto", "`auto` (CUDA when visible), `cpu`, `cuda`")
    device_profiles: str = _key(
        "", "simulated devices `name:memory_mb[:speed[:mbps[:ms]]]`, comma-separated; partition `i` gets entry "
            "`i mod n`; `memory_mb` 0 = unlimited")
    memory_budget_mb: float = _key(
        0.0, "a client's memory budget when neither its node config nor a profile gives one; `0` = unlimited")
    memory_margin: float = _key(0.1, "share of the budget held back from the estimator's prediction")
    memory_check_every: int = _key(
        0, "CPU clients measure their step's peak memory (a profiled replay, [more](#memory-check-every)) in the first "
           "and the last round; `N` also every N-th round; `-1` = never. CUDA measures every round at no cost")
    batch_policy: str = _key(
        "fixed", "how `b_i` are set: `fixed` (`global-batch-size`, even split), `memory-max` (every client at its "
                 "memory limit), `optimal` (the performance model's choice; see [performance.md](performance.md)), "
                 "`step` (`global-batch-size` x the `batch-steps` multiplier), `noise` (grows with the measured noise "
                 "scale up to the fleet's memory; [performance.md](performance.md#batch-schedules-step-and-noise))")
    batch_steps: str = _key(
        "0:1", "`step` policy: `start:multiplier` entries as `teacher-steps`; the round's global batch is "
               "`global-batch-size` x multiplier (Smith et al. 2018)")
    batch_ema: float = _key(
        0.9, "`noise` policy: per-round EMA decay of the measured tr(Sigma) and squared gradient norm (averaged apart; "
             "their ratio is the noise scale that sets the global batch)")
    batch_time_cap: bool = _key(
        True, "`noise` policy: also cap the global batch at the performance model's time-optimal batch for the "
              "measured noise scale (where more batch stops buying time); `false` = the fleet's memory only")
    batch_objective: str = _key(
        "time", "`optimal`: least predicted time to a target (`time`) or least device-seconds (`cost`)")
    calibration_rounds: int = _key(
        2, "`optimal`: rounds at `global-batch-size` that measure the gradient noise scale before choosing")
    round_latency_s: float = _key(
        0.0, "fixed seconds per round added to the virtual clock (`virtual_s`) and to the performance model's round "
             "time (`optimal` sees the cost of a round): Flower's polling and a fresh client process per message. "
             "The local rehearsal measured 11.7 s per round on real SuperNodes, 0.12 s of it client compute "
             "([deploy.md](deploy.md#10-what-a-round-costs-on-real-supernodes)); `0` = none")
    min_batch_fraction: float = _key(
        1.0, "a round goes ahead when its valid replies cover at least this share of the planned global batch "
             "(the exact mean over the examples that arrived); `1.0` = every sampled client must succeed")
    round_timeout_s: float = _key(
        600.0, "seconds a round waits for replies; a later reply counts as a failed client. "
               "The first round waits at least 120 s (client start-up)")
    max_norm_ratio: float = _key(
        50.0, "reject a client whose gradient norm exceeds this times the larger of the round's other clients' "
              "largest norm and the largest norm of the last 10 rounds ([more](#max-norm-ratio)); `0` = off")
    round_retries: int = _key(
        2, "times a round whose valid replies fall short of `min-batch-fraction` sends the failed clients' "
           "unchanged instructions again, within its deadline ([more](#round-retries))")
    max_failed_rounds: int = _key(
        5, "consecutive rounds that may end short of `min-batch-fraction` (skipped: the model unchanged) before the "
           "run stops; `0` = the first such round stops the run")
    aggregator: str = _key(
        "mean", "`mean` (the exact large-batch step), `centered-clip`, `median`, `trimmed-mean`, `krum` "
                "([faults.md](faults.md#robust-aggregators))")
    cc_radius: float = _key(
        0.0, "`centered-clip`: clipping radius tau, in gradient units; `0` = the weighted median of the clients' "
             "distances to the previous aggregate, every round")
    cc_iterations: int = _key(3, "`centered-clip`: clipping iterations L per round")
    cc_radius_scale: float = _key(
        1.5, "`centered-clip` with `cc-radius = 0`: tau = this times the median distance; larger passes more of "
             "every client (toward `mean`), smaller clips more; 1.5 was chosen on validation ([byzantine.md](byzantine.md#choosing-the-radius))")
    cc_drop_ratio: float = _key(
        10.0, "`centered-clip`: clients farther from the previous aggregate than this many times the median "
              "distance get no weight in the round (clipped, they would still pull by tau); `0` = off, else above 1; "
              "10 was chosen on validation ([byzantine.md](byzantine.md#dropping-far-clients))")
    bucket_size: int = _key(
        1, "robust aggregators: average the round's clients in random buckets of this many (b_i-weighted) and "
           "aggregate the bucket means (Karimireddy et al. 2022); `1` = off "
           "([byzantine.md](byzantine.md#bucketing))")
    exclude_ratio: float = _key(
        0.0, "robust aggregators: exclude for good a client whose summed gradients differ from most clients' by more "
             "than this many times what noise alone gives; `0` = off, else above 1; 6 suits IID clients with much data "
             "([byzantine.md](byzantine.md#excluding-persistent-clients))")
    exclude_after: int = _key(10, "`exclude-ratio`: rounds a client must have sent before it can be excluded")
    byzantine_fraction: float = _key(
        0.2, "`krum`: assumes floor(fraction * K) Byzantine clients; `trimmed-mean`: share of the weight (b_i) "
             "trimmed at each end, per coordinate")
    secure_aggregation: bool = _key(
        False, "the server learns only the sum of the sampled clients' b_i-weighted gradients (Flower's SecAgg+, "
               "4 round trips a round; [secure-aggregation.md](secure-aggregation.md))")
    secagg_threshold: int = _key(
        0, "secure aggregation: clients that must survive a round (Shamir threshold t, 2 <= t < K); "
           "`0` = floor(K/2) + 1 of the round's K clients")
    secagg_clip_norm: float = _key(
        100.0, "secure aggregation: each client clips its gradient to this L2 norm C, which is also the "
               "quantiser's range [-C, C] (replaces the norm guard; [bound](secure-aggregation.md#exactness))")
    dp_clip_norm: float = _key(
        0.0, "client-level DP ([differential-privacy.md](differential-privacy.md)): each client clips its gradient to this L2 norm `C`, in "
             "gradient units; `0` = DP off")
    dp_noise_multiplier: float = _key(
        0.0, "DP: `z`; the server adds Gaussian noise of std `z C / W` per coordinate to the mean gradient "
             "(`W` the round's fixed denominator); `0` with a clip = clipping only (epsilon infinite)")
    dp_delta: float = _key(1e-5, "DP: the delta at which `dp_epsilon` is reported, in (0, 1)")
    dp_target_epsilon: float = _key(
        0.0, "DP: `> 0` chooses `z` before round 1 (Opacus `get_noise_multiplier`) so that epsilon after "
             "`num-server-rounds` rounds is at most this; `0` = use `dp-noise-multiplier`")
    dp_accountant: str = _key("rdp", "DP: Opacus accountant, `rdp` (RDPAccountant) or `prv` (PRVAccountant)")
    dp_noise_seed: int = _key(
        -1, "DP: `-1` = the noise comes from a secret drawn in round 1 and kept in `checkpoint.pt` (a resumed run "
            "continues it); `>= 0` = from this seed and the round: reproducible, and removable by anyone who knows it")
    checkpoint_every: int = _key(
        10, "write `checkpoint.pt` every this many rounds and after the last; `0` = after the last only")
    resume: bool = _key(False, "continue the run in `out-dir` from its `checkpoint.pt` (set by `--resume DIR`)")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Return the run-config keys in kebab case."""
        return tuple(f.name.replace("_", "-") for f in fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Return the defaults as a kebab-case dict (the pyproject table)."""
        return {f.name.replace("_", "-"): f.default for f in fields(cls)}

    @classmethod
    def docs(cls) -> dict[str, str]:
        """Return each key's one-line doc (markdown), kebab-case keys in field order."""
        return {f.name.replace("_", "-"): f.metadata["doc"] for f in fields(cls)}

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
        for key, allowed in _CHOICES:
            _choice(key, self.value(key), allowed)
        for key in _POSITIVE:
            _positive(key, self.value(key))
        for key in _NON_NEGATIVE:
            _positive(key, self.value(key), allow_zero=True)
        for key in _FRACTIONS:  # [0, 1)
            if not 0.0 <= self.value(key) < 1.0:
                raise ConfigError(f"run-config key '{key}' = {self.value(key)!r}: must be in [0, 1).")
        if self.memory_check_every < -1:
            raise ConfigError(f"run-config key 'memory-check-every' = {self.memory_check_every}: must be >= -1 "
                              "(-1 never, 0 the first and last round, N also every N-th).")
        if not (0.0 <= self.teacher_switch < 1.0 or (self.teacher_switch >= 1 and float(self.teacher_switch).is_integer())):
            raise ConfigError(
                f"run-config key 'teacher-switch' = {self.teacher_switch!r}: must be a fraction of num-server-rounds "
                "in [0, 1) or a whole number of rounds >= 1."
            )
        if not (self.average_from == 0.0 or 0.0 < self.average_from < 1.0
                or (self.average_from >= 1 and float(self.average_from).is_integer())):
            raise ConfigError(
                f"run-config key 'average-from' = {self.average_from!r}: must be 0 (off), a fraction of "
                "num-server-rounds in (0, 1) or a whole number of rounds >= 1."
            )
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"run-config key 'val-fraction' = {self.val_fraction!r}: must be in (0, 0.5).")
        if not 0.0 < self.min_batch_fraction <= 1.0:
            raise ConfigError(
                f"run-config key 'min-batch-fraction' = {self.min_batch_fraction!r}: must be in (0, 1] "
                "(1 = every sampled client must deliver a valid gradient)."
            )
        if not 0.0 <= self.byzantine_fraction < 0.5:
            raise ConfigError(f"run-config key 'byzantine-fraction' = {self.byzantine_fraction!r}: must be in [0, 0.5) "
                              "(a robust aggregator needs an honest majority).")
        if self.max_norm_ratio != 0 and self.max_norm_ratio <= 1:
            raise ConfigError(
                f"run-config key 'max-norm-ratio' = {self.max_norm_ratio!r}: must be 0 (guard off) or > 1."
            )
        if self.cc_drop_ratio != 0 and not self.cc_drop_ratio > 1:
            raise ConfigError(f"run-config key 'cc-drop-ratio' = {self.cc_drop_ratio!r}: must be 0 (off) or > 1 "
                              "(times the median distance; at most 1 would drop honest clients).")
        if self.exclude_ratio != 0 and not (self.exclude_ratio > 1 and self.aggregator != "mean"):
            raise ConfigError(f"run-config key 'exclude-ratio' = {self.exclude_ratio!r} with aggregator = "
                              f"{self.aggregator!r}: must be 0 (off), or > 1 with a robust aggregator (not mean).")
        if self.secagg_threshold < 0 or self.secagg_threshold == 1:
            raise ConfigError(f"run-config key 'secagg-threshold' = {self.secagg_threshold!r}: must be 0 (auto) or >= 2.")
        if not self.secagg_clip_norm > 0:
            raise ConfigError(f"run-config key 'secagg-clip-norm' = {self.secagg_clip_norm!r}: must be > 0.")
        self._check_batches()
        self._check_privacy()

    def value(self, key: str) -> Any:
        """The value of run-config ``key`` (kebab-case)."""
        return getattr(self, key.replace("-", "_"))

    def _check_privacy(self) -> None:
        """The DP keys: ranges, and noise only with a clip (their interplay with other keys: strategies/privacy.py)."""
        if self.dp_noise_seed < -1:
            raise ConfigError(f"run-config key 'dp-noise-seed' = {self.dp_noise_seed}: must be -1 (a secret drawn "
                              "in round 1) or >= 0 (reproducible noise).")
        if not 0.0 < self.dp_delta < 1.0:
            raise ConfigError(f"run-config key 'dp-delta' = {self.dp_delta!r}: must be in (0, 1) (e.g. 1e-5, below "
                              "1 / the number of clients).")
        noise = [k for k in ("dp-noise-multiplier", "dp-target-epsilon") if self.value(k) > 0]
        if noise and self.dp_clip_norm == 0:
            raise ConfigError(
                f"run-config key '{noise[0]}' = {self.value(noise[0])!r} with dp-clip-norm = 0: noise without a clip "
                "bounds nothing. Allowed: a dp-clip-norm > 0 (the L2 clip C), or 0 for both (DP off).")
        if len(noise) == 2:
            raise ConfigError(
                f"run-config key 'dp-target-epsilon' = {self.dp_target_epsilon!r} with dp-noise-multiplier = "
                f"{self.dp_noise_multiplier!r}: set one. Allowed: dp-target-epsilon > 0 (z is chosen) with "
                "dp-noise-multiplier = 0, or dp-target-epsilon = 0.")

    def _check_batches(self) -> None:
        """The batch keys against each other."""
        if self.virtual_clients and self.clients_per_round > self.virtual_clients:
            raise ConfigError(
                f"run-config key 'clients-per-round' = {self.clients_per_round}: more than virtual-clients = "
                f"{self.virtual_clients}. Allowed: 0 (all) or 1..{self.virtual_clients}."
            )
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


_CHOICES = (("partitioner", PARTITIONERS), ("schedule", SCHEDULES), ("device", DEVICES),
            ("batch-policy", BATCH_POLICIES), ("batch-objective", ("time", "cost")), ("aggregator", AGGREGATORS),
            ("dp-accountant", DP_ACCOUNTANTS), ("teacher-velocity", ("sent", "from-weights")))
_POSITIVE = ("calibration-rounds", "dirichlet-alpha", "num-server-rounds", "global-batch-size", "local-steps", "lr",
             "eval-every", "teacher-small-batch", "teacher-local-steps", "teacher-val-batch", "round-timeout-s",
             "cc-iterations", "cc-radius-scale", "bucket-size", "exclude-after")
_NON_NEGATIVE = ("clients-per-round", "virtual-clients", "client-threads", "micro-batch-size", "weight-decay",
                 "warmup-rounds", "seed", "train-limit", "teacher-hyper-lr", "memory-budget-mb", "checkpoint-every",
                 "round-retries", "max-failed-rounds", "cc-radius", "round-latency-s", "dp-clip-norm",
                 "dp-noise-multiplier", "dp-target-epsilon", "teacher-local-until")
_FRACTIONS = ("memory-margin", "teacher-ema", "momentum", "batch-ema")


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
