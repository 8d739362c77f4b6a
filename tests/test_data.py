"""Datasets, splits and partitions, on the real offline archives."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from workloads.errors import ConfigError
from workloads.data import DataNotFoundError, augment_crop_flip, load_raw, load_splits, resolve_data_dir
from workloads.partition import partition_indices, partition_sizes

CIFAR_TRAIN_CONTENT_SHA256 = "f912919bdea371136f1aa4feed6beeca728015a5f08b1899a29c932a7e30be2b"


def test_cifar10_loads_exactly_from_the_data_folder(data_dir):
    raw = load_raw("cifar10", data_dir)
    assert raw.x_train.shape == (50000, 3, 32, 32) and raw.x_train.dtype == np.uint8
    assert raw.x_test.shape == (10000, 3, 32, 32)
    assert raw.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # official order
    assert raw.y_test[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(raw.y_train).tolist() == [5000] * 10
    assert np.bincount(raw.y_test).tolist() == [1000] * 10
    # Back to HWC, the bytes hash to the official content checksum from the data README.
    hwc = np.ascontiguousarray(raw.x_train.transpose(0, 2, 3, 1))
    digest = hashlib.sha256(hwc.tobytes() + raw.y_train.astype(np.uint8).tobytes()).hexdigest()
    assert digest == CIFAR_TRAIN_CONTENT_SHA256


def test_cifar10_splits_are_disjoint_and_normalised(data_dir):
    s = load_splits("cifar10", data_dir, 0.1)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (45000, 5000, 10000)
    assert s.x_train.dtype == torch.uint8 and s.x_train.shape[1:] == (3, 32, 32)
    x = s.inputs(s.x_train[:5000])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.05
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05
    # the CIFAR channel means are the well-known ones
    assert torch.allclose(s.mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]), atol=3e-3)


def test_mnist_loads(data_dir):
    raw = load_raw("mnist", data_dir)
    assert raw.x_train.shape == (60000, 1, 28, 28)
    assert np.bincount(raw.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_digits_needs_no_files():
    s = load_splits("digits", "", 0.1)
    assert len(s.y_train) + len(s.y_val) + len(s.y_test) == 1797
    assert s.x_train.shape[1:] == (1, 8, 8) and int(s.x_train.max()) == 16
    again = load_splits("digits", "", 0.2)
    assert len(again.y_val) == round(0.2 * 1438)


def test_missing_folder_and_missing_dataset_explain_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="'data-dir' = '/no/such/dir': folder does not exist"):
        resolve_data_dir("/no/such/dir")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataNotFoundError) as err:
        load_raw("mnist", str(tmp_path))
    assert "data-dir" in str(err.value) and "FLB_DATA_DIR" in str(err.value)


def test_iid_partitions_cover_everything_evenly():
    labels = np.repeat(np.arange(10), 100)
    parts = partition_indices(labels.astype(np.int64).tobytes(), 7, "iid", 0.5, 3)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))


def _label_skew(labels, parts):
    glob = np.bincount(labels, minlength=10) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - glob).sum() for p in parts])


def test_dirichlet_partitions_are_skewed_and_complete():
    labels = np.repeat(np.arange(10), 200).astype(np.int64)
    iid = partition_indices(labels.tobytes(), 8, "iid", 0.1, 0)
    skewed = partition_indices(labels.tobytes(), 8, "dirichlet", 0.1, 0)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(2000))
    assert min(len(p) for p in skewed) >= 10
    assert _label_skew(labels, skewed) > 0.4 > 0.1 > _label_skew(labels, iid)
    assert partition_sizes(labels, 8, "dirichlet", 0.1, 0) == [len(p) for p in skewed]


def test_augmentation_crops_and_flips():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5).repeat(32, 1, 1, 1)
    out = augment_crop_flip(x, gen, pad=0)  # no padding: only flips
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | flipped).all()) and same.any() and flipped.any()
    marker = torch.zeros(64, 1, 9, 9)
    marker[:, 0, 4, 4] = 1.0
    moved = augment_crop_flip(marker, gen, pad=2)
    rows, cols = moved[:, 0].nonzero(as_tuple=True)[1:]
    assert moved.sum() <= 64 and (rows - 4).abs().max() <= 2 and (cols - 4).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5  # the shifts vary
