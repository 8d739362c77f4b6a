"""Checks that run before anything expensive starts (Ray, a SuperLink, round 1).

``parse_run_config`` is the full parse of a run config: ``RunConfig.from_mapping`` (types and
ranges, a leaf module) plus the names that registries own (dataset, model, teacher, teacher
steps, device profiles) and what client-level DP allows (strategies/privacy.py). ``preflight``
adds what needs the data and the federation's size: partitions, local batches, memory budgets,
the device, the results folder and, with DP, a model without buffers. The launcher
(flb/launch/run.py) and the in-process runner (flb/inprocess.py) call both; the
ServerApp calls ``parse_run_config``. Every error names the key, the value and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from strategies.batch_policy import largest_scheduled_batch, scheduled_batch
from strategies.secure import check_secure
from strategies.privacy import check_privacy, check_private_model, dp_on
from strategies.tail_average import average_start
from strategies.teacher_registry import check_teacher
from strategies.teachers import parse_steps
from workloads.batches import check_batches_fit, split_global_batch
from workloads.config import RunConfig
from workloads.devices import MIB, memory_budget_mb, parse_profiles
from workloads.errors import ConfigError
from workloads.registry import check_workload



def parse_run_config(mapping: Mapping[str, Any]) -> RunConfig:
    """Parse a kebab-case run config and check every name in it (raises ConfigError)."""
    cfg = RunConfig.from_mapping(mapping)
    check_workload(cfg.dataset, cfg.model)
    check_teacher(cfg)
    parse_steps(cfg.batch_steps, cfg.num_server_rounds, "batch-steps")
    parse_profiles(cfg.device_profiles)
    average_start(cfg)
    check_privacy(cfg)
    return cfg


def preflight(cfg: RunConfig, num_nodes: int, client_threads: int = 1) -> list[str]:
    """Check a run against its data and federation before it starts; return warnings.

    Parameters
    ----------
    cfg : RunConfig
        A parsed config with absolute ``out-dir`` (and ``data-dir``, if any).
    num_nodes : int
        Simulated SuperNodes (partitions); ``virtual-clients``, when set, is the partition count instead.
    client_threads : int
        CPUs of a client process (its ``client-resources-num-cpus``); a client step's torch
        threads (``protocol.packing.step_threads``) choose its kernels, and so its memory.

    Raises
    ------
    ConfigError
        Naming the key, the value and what is allowed.
    """
    from workloads.data import load_splits
    from workloads.partition import partition_sizes
    from workloads.training import pick_device

    num_nodes = cfg.virtual_clients or num_nodes  # virtual clients: the partitions, not the Flower nodes
    k = cfg.clients_per_round or num_nodes
    if k > num_nodes:
        raise ConfigError(
            f"run-config key 'clients-per-round' = {k}: only num-supernodes = {num_nodes} clients exist. "
            f"Allowed: 0 (all) or 1..{num_nodes}."
        )
    check_secure(cfg, k, model_buffers(cfg) if cfg.secure_aggregation else 0)
    pick_device(cfg.device)
    check_out_dir(Path(cfg.out_dir), cfg.resume)
    if dp_on(cfg):
        check_private_model(cfg, model_buffers(cfg))
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.train_limit)
    batches = split_global_batch(cfg.global_batch_size, k)
    if cfg.batch_policy == "step":
        batches = scheduled_local_batches(cfg, k)
    if len(splits.y_train) == 0:  # node-local data (data-dir holds eval.npz only): each node checks its own
        return []
    enough = num_nodes * max(batches)
    if num_nodes > len(splits.y_train):
        raise ConfigError(
            f"run-config key 'train-limit' = {cfg.train_limit}: {len(splits.y_train)} training examples cannot make "
            f"{num_nodes} partitions. Allowed: 0 (all) or at least {enough}."
        )
    sizes = partition_sizes(splits.y_train.numpy(), num_nodes, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed)
    try:
        if cfg.batch_policy == "step":
            check_schedule_fits(cfg, batches, sizes)
        else:
            check_batches_fit(batches, sizes)
    except ConfigError as err:
        if cfg.train_limit:
            raise ConfigError(f"run-config key 'train-limit' = {cfg.train_limit} leaves too few examples per "
                              f"client (Allowed: 0 or at least {enough}). {err}") from None
        raise
    return check_memory(cfg, splits, num_nodes, max(batches), client_threads)


def model_buffers(cfg: RunConfig) -> int:
    """The number of non-trainable tensors (BatchNorm statistics) of the run's model."""
    from workloads.models import build_model
    from workloads.registry import WORKLOADS, resolve_model

    workload = WORKLOADS[cfg.dataset]
    model = build_model(resolve_model(cfg.dataset, cfg.model), workload.input_shape, workload.num_classes, cfg.seed)
    return len(list(model.buffers()))


def scheduled_local_batches(cfg: RunConfig, k: int) -> list[int]:
    """``batch-policy = step``: the local batches of the round with the largest scheduled global batch.

    Refuses a schedule whose smallest B_r leaves a client of the round without an example.
    """
    steps = parse_steps(cfg.batch_steps, cfg.num_server_rounds, "batch-steps")
    scheduled = [scheduled_batch(cfg.global_batch_size, steps, s + 1) for s, _ in steps if s < cfg.num_server_rounds]
    if min(scheduled) < k:
        raise ConfigError(
            f"run-config key 'batch-steps' = {cfg.batch_steps!r}: a scheduled global batch of {min(scheduled)} "
            f"(global-batch-size {cfg.global_batch_size} x multiplier) is smaller than the round's {k} clients. "
            f"Allowed: multipliers >= {k / cfg.global_batch_size:.4g} (one example per client)."
        )
    return split_global_batch(largest_scheduled_batch(cfg.global_batch_size, steps, cfg.num_server_rounds), k)


def check_schedule_fits(cfg: RunConfig, batches: list[int], sizes: list[int]) -> None:
    """Refuse a ``batch-steps`` schedule whose largest round gives a client more than the smallest partition."""
    largest, smallest, k = max(batches), min(sizes), len(batches)
    if largest > smallest:
        raise ConfigError(
            f"run-config key 'batch-steps' = {cfg.batch_steps!r}: its largest global batch, {sum(batches)} "
            f"(global-batch-size {cfg.global_batch_size} x multiplier), gives a client {largest} examples, more than "
            f"the smallest client partition ({smallest} examples). Allowed: multipliers <= "
            f"{smallest * k / cfg.global_batch_size:.4g} (global batch <= {smallest * k} for {k} clients), "
            "a smaller global-batch-size, or more data per client."
        )


def check_memory(cfg: RunConfig, splits, num_nodes: int, local_batch: int, client_threads: int) -> list[str]:
    """Refuse budgets that cannot hold a local batch even in micro-batches of one example.

    Clients that would fail are tolerated (with a warning) while their share of the global
    batch stays within ``1 - min-batch-fraction``: the rounds go on without them.
    """
    import torch

    from estimators.client_step import step_estimator
    from protocol.packing import step_threads
    from workloads.models import build_model
    from workloads.registry import WORKLOADS, resolve_model
    from workloads.training import pick_device

    profiles = parse_profiles(cfg.device_profiles)
    budgets = [memory_budget_mb({}, profiles, cfg.memory_budget_mb, i) for i in range(num_nodes)]
    if not any(b > 0 for b, _ in budgets):
        return []
    workload = WORKLOADS[cfg.dataset]
    model = build_model(resolve_model(cfg.dataset, cfg.model), workload.input_shape, workload.num_classes, cfg.seed)
    device = pick_device(cfg.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(step_threads(cfg, client_threads, device))
    try:
        need_mb = step_estimator(cfg, splits, model.to(device), device).peak_bytes(local_batch, 1) / MIB
    finally:
        torch.set_num_threads(threads)
    need_mb /= 1 - cfg.memory_margin
    short = [(i, b, src) for i, (b, src) in enumerate(budgets) if 0 < b < need_mb]
    if not short:
        return []
    k = cfg.clients_per_round or num_nodes
    share = min(1.0, len(short) * local_batch / cfg.global_batch_size) if k == num_nodes else len(short) / num_nodes
    listing = "; ".join(f"partition {i}: {src} = {b:g} MiB" for i, b, src in short[:6])
    if share > 1 - cfg.min_batch_fraction + 1e-12:
        raise ConfigError(
            f"{short[0][2]} = {short[0][1]:g} MiB is too small: a local batch of {local_batch} needs {need_mb:.1f} MiB "
            f"even in micro-batches of one example (memory-margin {cfg.memory_margin:g}); {len(short)} of {num_nodes} "
            f"clients would fail ({listing}), {100 * share:.0f}% of the batch, more than 1 - min-batch-fraction = "
            f"{1 - cfg.min_batch_fraction:.2g}. Allowed: budgets >= {need_mb:.1f} MiB, a smaller global-batch-size, "
            "or a lower min-batch-fraction."
        )
    return [f"{len(short)} of {num_nodes} clients will fail every round ({listing}; need {need_mb:.1f} MiB); "
            f"min-batch-fraction = {cfg.min_batch_fraction:g} lets the rounds go on without them"]


def model_buffers(cfg: RunConfig) -> list[str]:
    """The names of the run's model's buffers (BatchNorm statistics), from a model built on the CPU."""
    from workloads.models import build_model
    from workloads.registry import WORKLOADS, resolve_model

    workload = WORKLOADS[cfg.dataset]
    model = build_model(resolve_model(cfg.dataset, cfg.model), workload.input_shape, workload.num_classes, cfg.seed)
    return [name for name, _ in model.named_buffers()]


def check_out_dir(path: Path, resume: bool) -> None:
    """Refuse a results folder that cannot be created, or that holds a run when not resuming."""
    from server_app.results import holds_run

    if path.exists() and not path.is_dir():
        raise ConfigError(f"run-config key 'out-dir' = '{path}' exists and is not a folder.")
    if path.is_dir() and holds_run(path) and not resume:
        raise ConfigError(
            f"run-config key 'out-dir' = '{path}' already holds a run (rounds.csv or checkpoint.pt). "
            "Allowed: a new folder, or --resume DIR to continue that run."
        )
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(
            f"run-config key 'out-dir' = '{path}' cannot be created: '{ancestor}' is "
            f"{'not a folder' if not ancestor.is_dir() else 'not writable'}. Allowed: a folder you can write to."
        )
