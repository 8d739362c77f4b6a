"""The models ``experiments.bench_memory`` measures: the project's own, torchvision's unmodified
constructors, a token transformer and an LSTM, with the batch sizes of each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.models as tvm
from torch import nn

from workloads.models import build_model

NUM_CLASSES = 10


class TokenTransformer(nn.Module):
    """Transformer-encoder text classifier over int64 token ids of shape (batch, seq_len).

    Embedding + learned positions, ``layers`` post-norm encoder layers (dropout 0.1), mean
    pooling, linear head. The non-convolutional benchmark model.
    """

    def __init__(self, vocab: int = 1000, seq_len: int = 64, d_model: int = 128, heads: int = 4, layers: int = 2, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(1))


class LSTMClassifier(nn.Module):
    """Two-layer LSTM over float feature sequences (batch, seq_len, features); last step -> head."""

    def __init__(self, features: int = 32, hidden: int = 128, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


@dataclass(frozen=True)
class BenchModel:
    """One benchmarked model: how to build it, its input, and the batch sizes to measure."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch_sizes: tuple[int, ...]  # examples; torchvision nets at 32x32 end in a 1x1 BatchNorm: b >= 2
    input_dtype: torch.dtype = torch.float32
    micro: tuple[tuple[int, int], ...] = ()  # (batch, micro-batch) cases


def _project(name: str, shape: tuple[int, ...]) -> Callable[[], nn.Module]:
    return lambda: build_model(name, shape, NUM_CLASSES, seed=0)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(tvm, name)(num_classes=NUM_CLASSES)  # unmodified constructor, 32x32 input


ALL = (1, 2, 8, 16, 32, 128)
NO_ONE = (2, 8, 16, 32, 128)


def bench_models(quick: bool) -> list[BenchModel]:
    """The benchmarked models (quick: four small ones, four batch sizes)."""
    if quick:
        few = (1, 2, 8, 32)
        return [
            BenchModel("mlp-digits", _project("mlp", (1, 8, 8)), (1, 8, 8), few),
            BenchModel("cnn-cifar10", _project("cnn", (3, 32, 32)), (3, 32, 32), few, micro=((32, 8),)),
            BenchModel("cnn-mnist", _project("cnn", (1, 28, 28)), (1, 28, 28), few),
            BenchModel("transformer-tokens", TokenTransformer, (64,), few, torch.long),
        ]
    c32 = (3, 32, 32)
    return [
        BenchModel("mlp-digits", _project("mlp", (1, 8, 8)), (1, 8, 8), ALL),
        BenchModel("mlp-mnist", _project("mlp", (1, 28, 28)), (1, 28, 28), ALL),
        BenchModel("cnn-cifar10", _project("cnn", c32), c32, ALL, micro=((128, 16), (100, 32))),
        BenchModel("cnn-mnist", _project("cnn", (1, 28, 28)), (1, 28, 28), ALL),
        BenchModel("resnet18", _project("resnet18", c32), c32, ALL, micro=((128, 32),)),
        BenchModel("resnet50", _project("resnet50", c32), c32, (1, 2, 8, 16, 32, 64)),
        BenchModel("vgg11", _project("vgg11", c32), c32, ALL),
        BenchModel("tv-resnet18", _torchvision("resnet18"), c32, NO_ONE),
        BenchModel("tv-resnet50", _torchvision("resnet50"), c32, NO_ONE),
        BenchModel("tv-vgg11", _torchvision("vgg11"), c32, ALL),
        BenchModel("tv-mobilenet_v2", _torchvision("mobilenet_v2"), c32, NO_ONE, micro=((128, 16),)),
        BenchModel("tv-efficientnet_b0", _torchvision("efficientnet_b0"), c32, NO_ONE),
        BenchModel("transformer-tokens", TokenTransformer, (64,), ALL, torch.long, micro=((128, 32),)),
        BenchModel("lstm-features", LSTMClassifier, (50, 32), ALL),
    ]
