"""Every registered model builds for its workloads and maps a batch to class logits, and the weight load skips only an unchanged reload."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from client_app.job import load_global
from workloads.models import build_model
from workloads.registry import WORKLOADS


@pytest.mark.parametrize(
    "dataset,model", [(w.name, m) for w in WORKLOADS.values() for m in w.models]
)
def test_forward_and_backward_shapes(dataset, model):
    w = WORKLOADS[dataset]
    net = build_model(model, w.input_shape, w.num_classes, seed=0)
    x = torch.randn(2, *w.input_shape)
    out = net(x)
    assert out.shape == (2, w.num_classes)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_cifar_cnn_size_is_cpu_sized():
    net = build_model("cnn", (3, 32, 32), 10, seed=0)
    # conv 3-32, 32-64, 64-128 (3x3 + bias), fc 128*4*4-256, 256-10
    expected = (3 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (64 * 9 * 128 + 128) + (2048 * 256 + 256) + (256 * 10 + 10)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_seed_fixes_initial_weights():
    a = build_model("mlp", (1, 8, 8), 10, seed=3)
    b = build_model("mlp", (1, 8, 8), 10, seed=3)
    c = build_model("mlp", (1, 8, 8), 10, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_resnet_stem_keeps_32x32_resolution():
    net = build_model("resnet18", (3, 32, 32), 10, seed=0)
    feats = net.maxpool(net.relu(net.bn1(net.conv1(torch.randn(1, 3, 32, 32)))))
    assert feats.shape[-2:] == (32, 32)


def test_load_global_skips_only_an_unchanged_reload():
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    record = ArrayRecord(build_model("cnn", (1, 8, 8), 10, seed=1).state_dict())
    load_global(model, record)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    versions = [p._version for p in model.parameters()]
    load_global(model, record)  # the same record, nothing changed: no copy
    assert [p._version for p in model.parameters()] == versions
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a local step changes the weights in place
    load_global(model, record)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    load_global(model, ArrayRecord(build_model("cnn", (1, 8, 8), 10, seed=2).state_dict()))  # a new record loads
    assert not torch.equal(next(model.parameters()), next(iter(expected.values())))
