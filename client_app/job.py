"""Per-process client resources, built once and reused across rounds.

A Ray actor (simulation) serves many rounds and many partitions. The dataset tensors (memory-
mapped from the on-disk cache), the partition index tensors and one model object per
architecture (and per client thread, client_app/packing.py) are built on first use and cached
here, so a round only copies weights in and gradients out. Nothing here is state a round depends on: a
SuperNode starts a fresh ClientApp process per message and rebuilds it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from estimators.client_step import make_inputs, step_estimator
from estimators.memory import MemoryEstimator
from protocol.arrays import record_tensors
from workloads.cache import set_root
from workloads.config import RunConfig
from workloads.devices import MIB
from workloads.errors import ConfigError
from workloads.data import Splits, load_splits
from workloads.models import build_model
from workloads.node_data import load_partition
from workloads.partition import client_partition
from workloads.registry import WORKLOADS, resolve_model
from workloads.training import draw_batch, pick_device



@dataclass(frozen=True)
class MemoryPlan:
    """How a client runs one round's batch under its memory budget."""

    micro_batch: int  # examples per forward/backward pass
    predicted_mb: float  # the estimator's peak for (batch, micro_batch), MiB
    budget_mb: float  # the budget, MiB (0 = unlimited)
    max_batch: int  # largest single-pass batch that fits budget x (1 - margin); 0 without a budget


@dataclass
class ClientJob:
    """Everything a client needs for one run config: data, its partition, a model."""

    cfg: RunConfig
    splits: Splits
    partition: torch.Tensor  # int64 indices into splits.x_train
    model_key: tuple[str, tuple[int, ...], int, str]  # shared_model's (architecture, input shape, classes, device)
    loss_fn: nn.Module
    device: torch.device
    augment: bool

    partition_id: int = 0

    @property
    def model(self) -> nn.Module:
        """The process's model for this architecture, one per client thread (``model_slot``)."""
        return shared_model(*self.model_key, model_slot())

    def draw(self, drawn: int, batch: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Draw ``steps`` batches of ``batch`` examples, continuing after ``drawn`` examples.

        The sampler is an epoch-wise shuffle of this client's partition. Its position is the
        number of examples the partition has drawn so far, which the server sends every round
        (``drawn-examples``): a client keeps no sampler state, so a fresh ClientApp process, a
        restarted SuperNode or a resumed run draws exactly the same examples.
        """
        n = len(self.partition)
        epoch, cursor = divmod(drawn, n)
        seed = self.cfg.seed * 7919 + self.partition_id
        out = []
        for _ in range(steps):
            pos, epoch, cursor = draw_batch(n, batch, seed, epoch, cursor)
            idx = self.partition[pos]
            # index_select, not x[idx]: advanced indexing of the uint8 images took 7.5 ms for 5 rows with
            # 2 threads (OpenMP start-up; 7 us with 1), index_select 2 us: the same rows
            out.append((self.splits.x_train.index_select(0, idx), self.splits.y_train.index_select(0, idx)))
        return out

    @property
    def estimator(self) -> MemoryEstimator:
        """Memory estimator of this client's exact step (``step_estimator``)."""
        return step_estimator(self.cfg, self.splits, self.model, self.device)

    def memory_plan(self, batch: int, micro: int, budget_mb: float, source: str) -> MemoryPlan:
        """Micro-batch for ``batch`` examples under ``budget_mb`` MiB less the run's ``memory-margin``.

        The server's micro-batch is kept when the step fits; otherwise the estimator's largest
        fitting micro-batch (balanced over the passes) is used: accumulation is exact, so the
        gradient does not change. ``budget_mb = 0`` means no limit.

        Raises
        ------
        ConfigError
            If not even micro-batches of one example fit, naming where the budget came from.
        """
        est, micro = self.estimator, min(micro, batch)
        usable = int(budget_mb * MIB * (1 - self.cfg.memory_margin)) if budget_mb > 0 else 0
        plan = _fitted_plan(est, batch, micro, usable)
        if plan is None:  # not even micro-batches of one example fit
            need_mb = est.peak_bytes(batch, 1) / MIB / (1 - self.cfg.memory_margin)
            raise ConfigError(
                f"{source} = {budget_mb:g} MiB is too small for partition {self.partition_id}'s batch of {batch}: "
                f"even micro-batches of one example need {need_mb:.1f} MiB with memory-margin "
                f"{self.cfg.memory_margin:g}. Allowed: a budget >= {need_mb:.1f} MiB, or a smaller global-batch-size."
            )
        micro, peak_bytes, max_batch = plan
        return MemoryPlan(micro, peak_bytes / MIB, budget_mb if usable else 0.0, max_batch)

    def inputs_fn(self, generator: torch.Generator | None):
        """Return the uint8 -> float input function for this round (augmenting if enabled)."""
        return make_inputs(self.splits, self.device, self.augment, generator)


@functools.lru_cache(maxsize=4096)
def _fitted_plan(est: MemoryEstimator, batch: int, micro: int, usable: int) -> tuple[int, int, int] | None:
    """(micro-batch, predicted peak bytes, largest single-pass batch) under ``usable`` bytes (0: no
    limit), or None when nothing fits; cached per process (every round asks again, for every client)."""
    if not usable:
        return micro, est.peak_bytes(batch, micro), 0
    if est.peak_bytes(batch, micro) > usable:
        try:
            micro = est.micro_batch_for(batch, usable)
        except ValueError:
            return None
    return micro, est.peak_bytes(batch, micro), est.max_batch_size(usable)


def node_identity(node_config: Mapping[str, object], cfg: RunConfig) -> tuple[int, int, str]:
    """This node's partition id, number of partitions and own data folder, from its node config.

    Node-config keys (``flower-supernode --node-config``; simulation sets the first two):
    ``partition-id`` and ``num-partitions`` (default 0 and 1), ``data-dir`` (the node's own
    examples, written by ``python -m deploy.split_data``; then the two ids come from that file
    when not given), ``cache-dir`` (the node-local array cache, workloads/cache.py) and
    ``memory-budget-mb`` (workloads/devices.py).

    Raises
    ------
    ConfigError
        Naming the node-config key whose value is invalid or contradicts the data folder.
    """
    if node_config.get("cache-dir"):
        set_root(str(node_config["cache-dir"]))
    ids = {}
    for key in ("partition-id", "num-partitions"):
        if key in node_config:
            value = node_config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "partition-id" else 1):
                raise ConfigError(f"node-config key '{key}' = {value!r} is invalid. Allowed: an integer >= "
                                  f"{0 if key == 'partition-id' else 1}.")
            ids[key] = value
    data_dir = str(node_config.get("data-dir", "") or "")
    if data_dir:
        _, pid, nparts = load_partition(data_dir, cfg, ids.get("partition-id"), ids.get("num-partitions"))
        return pid, nparts, data_dir
    return ids.get("partition-id", 0), ids.get("num-partitions", 1), ""


_LOADED: dict[int, tuple[object, tuple[int, ...]]] = {}  # id(model) -> (record, tensor versions) of its last load


def _versions(model: nn.Module) -> tuple[int, ...]:
    return tuple(t._version for t in (*model.parameters(), *model.buffers()))


def load_global(model: nn.Module, record: ArrayRecord) -> None:
    """Load the global weights and buffers of ``record`` into ``model``, unless they are there already.

    Packed virtual clients (protocol/packing.py) share one weights record per bundle, so a
    process serving 50 of them would load the same values 50 times (7 % of its time for the
    MNIST CNN). The load is skipped when ``record`` is the object loaded last and no parameter or
    buffer changed in place since: every in-place change (an optimizer step, a local step,
    BatchNorm's running statistics) bumps the tensor's version counter.
    """
    last = _LOADED.get(id(model))
    if last is not None and last[0] is record and last[1] == _versions(model):
        return
    model.load_state_dict(record_tensors(record, copy=False))
    _LOADED[id(model)] = (record, _versions(model))


_THREAD = threading.local()  # .slot: this thread's model replica (client_app/packing.py sets it in its workers)


def model_slot() -> int:
    """The model replica of the calling thread: 0, or 1..T in the T client threads of a bundle."""
    return getattr(_THREAD, "slot", 0)


def set_model_slot(slot: int) -> None:
    """Make the calling thread use model replica ``slot`` (a client thread's initialiser)."""
    _THREAD.slot = slot


@functools.lru_cache(maxsize=64)
def shared_model(name: str, input_shape: tuple[int, ...], num_classes: int, device: str, slot: int = 0) -> nn.Module:
    """One model object per process, architecture, device and client thread (``slot``).

    Every round loads the global weights and buffers into it before anything else, so its
    initial values do not matter and all the partitions a process serves can share it: a Ray
    actor serving 1,000 partitions of ResNet-50 holds one copy per client thread, not one per
    partition.
    """
    return build_model(name, input_shape, num_classes, seed=0).to(device)


@functools.lru_cache(maxsize=4096)
def get_job(cfg: RunConfig, partition_id: int, num_partitions: int, node_data_dir: str = "") -> ClientJob:
    """The data, partition and model of a client (cached per process; cheap to rebuild).

    A job holds references to the process's shared dataset tensors (memory-mapped from the
    on-disk cache) and shared model, and its own partition: an index tensor that is a view of
    the cached partition arrays. Nothing in it grows with the model per partition. With
    ``node_data_dir`` the node holds only its own examples (workloads/node_data.py): its
    training split is its partition, in the order a shared-data run would index it.
    """
    workload = WORKLOADS[cfg.dataset]
    if node_data_dir:
        splits, _, _ = load_partition(node_data_dir, cfg, partition_id, num_partitions)
        idx = np.arange(len(splits.y_train))
    else:
        splits = load_splits(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.train_limit)
        idx = client_partition(
            splits.y_train.numpy(), partition_id, num_partitions, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed
        )
    device = pick_device(cfg.device)
    return ClientJob(
        cfg=cfg,
        splits=splits,
        partition=torch.from_numpy(np.asarray(idx)),
        model_key=(resolve_model(cfg.dataset, cfg.model), tuple(workload.input_shape), workload.num_classes, str(device)),
        loss_fn=workload.loss(),
        device=device,
        augment=cfg.augment and workload.augment,
        partition_id=partition_id,
    )
