"""The one registry of workloads: dataset, its shape, its models and its loss.

Adding a workload is one entry here (plus a loader branch in workloads/data.py when its
files have a new layout). Adding a model is one entry in workloads/models.MODELS and its
name in ``models`` below.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from workloads.errors import ConfigError


@dataclass(frozen=True)
class Workload:
    """A dataset with the models that fit it."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W) of one example
    num_classes: int
    default_model: str
    models: tuple[str, ...]
    augment: bool  # whether random crop + flip applies (run-config key augment)

    def loss(self) -> nn.Module:
        """Per-example loss, summed; callers divide by the batch size they average over."""
        return nn.CrossEntropyLoss(reduction="sum")


WORKLOADS: dict[str, Workload] = {
    "digits": Workload("digits", (1, 8, 8), 10, "mlp", ("mlp", "cnn"), augment=False),
    "mnist": Workload("mnist", (1, 28, 28), 10, "cnn", ("mlp", "cnn"), augment=False),
    "cifar10": Workload(
        "cifar10", (3, 32, 32), 10, "cnn", ("cnn", "resnet18", "resnet50", "vgg11"), augment=True
    ),
}


def check_workload(dataset: str, model: str) -> None:
    """Raise ConfigError unless ``dataset`` is registered and ``model`` fits it."""
    if dataset not in WORKLOADS:
        raise ConfigError(
            f"run-config key 'dataset' = {dataset!r} is not allowed. Allowed: {', '.join(WORKLOADS)}."
        )
    resolve_model(dataset, model)


def resolve_model(dataset: str, model: str) -> str:
    """Return the model name to build; ``"auto"`` means the workload's default.

    Raises
    ------
    ConfigError
        When the model does not fit the dataset.
    """
    workload = WORKLOADS[dataset]
    name = workload.default_model if model == "auto" else model
    if name not in workload.models:
        raise ConfigError(
            f"run-config key 'model' = {model!r} is not allowed with dataset '{dataset}'. "
            f"Allowed: auto, {', '.join(workload.models)}."
        )
    return name
