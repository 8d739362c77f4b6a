"""The memory estimator of a client's exact step, shared by the ClientApp and the launcher's checks.

The client step (``workloads.training.batch_gradient``) keeps its gradients between rounds, and
its inputs are the stored uint8 batch turned into floats per micro-batch; the estimator models
exactly that step (estimators/memory.py).
"""

from __future__ import annotations

import platform

import torch
from torch import nn

from estimators.memory import MemoryEstimator, StepMemoryModel
from workloads.cache import cached_arrays
from workloads.config import RunConfig
from workloads.data import Splits, augment_crop_flip
from workloads.registry import WORKLOADS, resolve_model

_ESTIMATORS: dict[tuple, MemoryEstimator] = {}  # one per (workload, model, device, augment, threads), per process
SET_TO_NONE = False  # the client step keeps gradients: batch_gradient's zero_grad(set_to_none=False)


def make_inputs(splits: Splits, device: torch.device, augment: bool, generator: torch.Generator | None):
    """The uint8 -> float input function of a client step: normalise, move, augment if enabled."""

    def inputs(x: torch.Tensor) -> torch.Tensor:
        out = splits.inputs(x, device)
        if augment and generator is not None:
            out = augment_crop_flip(out, generator)
        return out

    return inputs


def step_estimator(cfg: RunConfig, splits: Splits, model: nn.Module, device: torch.device) -> MemoryEstimator:
    """Memory estimator of a client's exact step: stored uint8 batch, inputs per micro-batch, no optimizer.

    The step keeps its gradients between rounds (``batch_gradient``'s ``zero_grad(set_to_none=False)``),
    so the estimator is built with ``set_to_none=False`` (``SET_TO_NONE``), not its default (PyTorch's
    loop, which frees them); the mode is part of the on-disk cache key.

    It depends on the architecture, input pipeline, device and thread count (kernel choice),
    not on the weights, seed or partition: a process builds one per such key. The launcher's
    pre-flight check builds the same one to refuse a budget that cannot hold a batch.
    """
    augment = cfg.augment and WORKLOADS[cfg.dataset].augment
    key = (cfg.dataset, resolve_model(cfg.dataset, cfg.model), str(device), augment, torch.get_num_threads())
    if key not in _ESTIMATORS:
        shape, dtype = tuple(splits.x_train.shape[1:]), splits.x_train.dtype

        def build(fitted: StepMemoryModel | None = None) -> MemoryEstimator:
            return MemoryEstimator(
                model, shape, WORKLOADS[cfg.dataset].num_classes, "none",
                make_input=lambda b: torch.zeros((b, *shape), dtype=dtype),
                transform=make_inputs(splits, device, augment, torch.Generator().manual_seed(0)), device=device,
                fitted=fitted, set_to_none=SET_TO_NONE,
            )

        if device.type == "cpu":  # a CPU fit is fixed: keep it on disk for the next process (a SuperNode's next message)
            disk_key = {"step": list(key), "shape": list(shape), "torch": torch.__version__, "machine": platform.machine(),
                        "model_arch": str(model), "set_to_none": SET_TO_NONE, "version": 2}
            fitted = StepMemoryModel.from_arrays(cached_arrays("memory-fits", disk_key, lambda: build().step_model.to_arrays()))
            _ESTIMATORS[key] = build(fitted)
        else:
            _ESTIMATORS[key] = build()
    return _ESTIMATORS[key]
