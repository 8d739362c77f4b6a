"""Model constructors. Each takes the input shape (C, H, W) and the number of classes.

- ``mlp``: two hidden layers of 128 units, ReLU. For digits and MNIST.
- ``cnn``: conv3x3-ReLU-maxpool blocks (32, 64, 128 channels; as many as the image size
  allows, at most three), then a 256-unit hidden layer. No normalisation layers, so the
  federated step is exactly centralised SGD. The CPU-sized CIFAR-10 model (0.62 M params).
- ``resnet18``, ``resnet50``: torchvision's constructors adapted to 32x32 inputs the usual
  way: the 7x7 stride-2 stem becomes a 3x3 stride-1 conv and the stem max-pool is dropped.
- ``vgg11``: torchvision's ``vgg11_bn`` features (5 max-pools take 32x32 to 1x1), then a
  512-512-classes classifier instead of the ImageNet 25088-4096-4096 one.

BatchNorm buffers (running mean/var) travel with the weights; see
strategies/aggregation.py for how the server aggregates them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    """Two-hidden-layer perceptron on flattened inputs."""
    features = 1
    for d in input_shape:
        features *= d
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def cnn(input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...] = (32, 64, 128), hidden: int = 256) -> nn.Module:
    """Small VGG-style CNN without normalisation; depth adapts to the image size."""
    channels, size, _ = input_shape
    layers: list[nn.Module] = []
    for width in widths:
        if size < 4:  # keep at least a 2x2 map after the last pool
            break
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels, size = width, size // 2
    layers += [nn.Flatten(), nn.Linear(channels * size * size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """torchvision ResNet-18 with a CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    from torchvision.models import resnet18 as tv_resnet18

    return _cifar_stem(tv_resnet18(num_classes=num_classes), input_shape[0])


def resnet50(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """torchvision ResNet-50 with a CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    from torchvision.models import resnet50 as tv_resnet50

    return _cifar_stem(tv_resnet50(num_classes=num_classes), input_shape[0])


def vgg11(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """torchvision VGG-11 (with BatchNorm) features and a 512-512-classes head for 32x32."""
    from torchvision.models import vgg11_bn

    model = vgg11_bn(num_classes=num_classes)
    if input_shape[0] != 3:
        model.features[0] = nn.Conv2d(input_shape[0], 64, 3, padding=1)
    model.avgpool = nn.Identity()
    model.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes))
    return model


def _cifar_stem(model: nn.Module, in_channels: int) -> nn.Module:
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg11": vgg11,
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Construct model ``name`` with weights initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](input_shape, num_classes)
