"""Per-process client resources, built once and reused across rounds.

A Ray actor (simulation) or a SuperNode process serves many rounds, and in simulation many
partitions. The dataset tensors, partition index tensors and model object are built on first
use and cached here, so a round only copies weights in and gradients out.
"""

from __future__ import annotations

import functools
import resource
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from workloads.config import RunConfig
from workloads.data import Splits, augment_crop_flip, load_splits
from workloads.models import build_model
from workloads.partition import client_partition
from workloads.registry import WORKLOADS, resolve_model
from workloads.training import draw_batch, pick_device


@dataclass
class ClientJob:
    """Everything a client needs for one run config: data, its partition, a model."""

    cfg: RunConfig
    splits: Splits
    partition: torch.Tensor  # int64 indices into splits.x_train
    model: nn.Module
    loss_fn: nn.Module
    device: torch.device
    augment: bool

    partition_id: int = 0

    def draw(self, state: RecordDict, batch: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Draw ``steps`` batches of ``batch`` examples and advance the sampler in ``state``.

        The sampler is an epoch-wise shuffle of this client's partition; its position
        (epoch, cursor) lives in ``state["sampler"]`` (the ClientApp's ``context.state``), so
        it survives across rounds in simulation and on a SuperNode alike.
        """
        record = state.config_records.get("sampler", ConfigRecord({"epoch": 0, "cursor": 0}))
        epoch, cursor = int(record["epoch"]), int(record["cursor"])
        seed = self.cfg.seed * 7919 + self.partition_id
        out = []
        for _ in range(steps):
            pos, epoch, cursor = draw_batch(len(self.partition), batch, seed, epoch, cursor)
            idx = self.partition[pos]
            out.append((self.splits.x_train[idx], self.splits.y_train[idx]))
        state["sampler"] = ConfigRecord({"epoch": epoch, "cursor": cursor})
        return out

    def inputs_fn(self, generator: torch.Generator | None):
        """Return the uint8 -> float input function for this round (augmenting if enabled)."""

        def inputs(x: torch.Tensor) -> torch.Tensor:
            out = self.splits.inputs(x, self.device)
            if self.augment and generator is not None:
                out = augment_crop_flip(out, generator)
            return out

        return inputs


@functools.lru_cache(maxsize=4)
def get_job(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientJob:
    """Build (once per process and config) the data, partition and model of a client."""
    workload = WORKLOADS[cfg.dataset]
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.train_limit)
    idx = client_partition(
        splits.y_train.numpy(), partition_id, num_partitions, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed
    )
    device = pick_device(cfg.device)
    model = build_model(resolve_model(cfg.dataset, cfg.model), workload.input_shape, workload.num_classes, cfg.seed)
    return ClientJob(
        cfg=cfg,
        splits=splits,
        partition=torch.from_numpy(np.asarray(idx)),
        model=model.to(device),
        loss_fn=workload.loss(),
        device=device,
        augment=cfg.augment and workload.augment,
        partition_id=partition_id,
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of the step: CUDA allocator peak, or the process's max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
