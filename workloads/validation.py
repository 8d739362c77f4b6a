"""The gradient of the validation loss at given weights, on the server (the learned teacher's data).

Only the **validation** split is used (never the test split): an epoch-wise shuffle of it,
``batch`` examples per call, in an order seeded by the run's seed. Its position is state
(``state_dict``), so a resumed run draws the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workloads.config import RunConfig
from workloads.training import batch_gradient, draw_batch

VAL_SEED_OFFSET = 31_337


class ValidationGradient:
    """``grad(params) -> list of tensors``: d(mean loss over a validation batch)/dw at ``params``.

    Data and model are built on the first call, so constructing one costs nothing.
    """

    def __init__(self, cfg: RunConfig, batch: int) -> None:
        self.cfg, self.batch = cfg, batch
        self.epoch = self.cursor = 0
        self._job = None

    def _build(self):
        from workloads.data import load_splits
        from workloads.models import build_model
        from workloads.registry import WORKLOADS, resolve_model

        c = self.cfg
        splits = load_splits(c.dataset, c.data_dir, c.val_fraction, c.train_limit)
        workload = WORKLOADS[c.dataset]
        model = build_model(resolve_model(c.dataset, c.model), workload.input_shape, workload.num_classes, 0)
        if self.batch > len(splits.y_val):
            from workloads.errors import ConfigError

            raise ConfigError(f"run-config key 'teacher-val-batch' = {self.batch}: the validation split has "
                              f"{len(splits.y_val)} examples. Allowed: 1..{len(splits.y_val)}.")
        self._job = (splits, model, workload.loss())
        return self._job

    @property
    def names(self) -> list[str]:
        """The model's parameter names, in ``parameters()`` order."""
        _, model, _ = self._job or self._build()
        return [n for n, _ in model.named_parameters()]

    def __call__(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The validation-batch gradient at ``params`` (the next batch of the shuffle)."""
        splits, model, loss_fn = self._job or self._build()
        with torch.no_grad():
            for p, w in zip(model.parameters(), params):
                p.copy_(w)
        pos, self.epoch, self.cursor = draw_batch(len(splits.y_val), self.batch, self.cfg.seed + VAL_SEED_OFFSET,
                                                  self.epoch, self.cursor)
        model.train()
        batch_gradient(model, loss_fn, splits.inputs, splits.x_val.index_select(0, pos), splits.y_val.index_select(0, pos))
        return [p.grad.detach().clone() for p in model.parameters()]

    def state_dict(self) -> dict:
        """Where the shuffle stands."""
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
