"""Datasets as in-memory uint8 tensors: loading, train/validation/test splits, batches.

Each process loads a dataset once (``load_splits`` is cached) and keeps it as one uint8
tensor per split, in NCHW layout, as airbench does. Batches are taken by indexing, converted
to float and normalised per batch, and augmented on the whole batch at once. There is no
DataLoader and no worker process.

Where the data comes from, in order:

1. ``data-dir`` from the run config, or ``$FLB_DATA_DIR``: a folder in the layout of the
   offline archives (``<dir>/cifar10/train_{1..5}.npz``, ``test.npz``; ``<dir>/mnist/
   train.npz``, ``test.npz``; arrays ``x`` uint8 and ``y`` uint8);
2. the user cache ``~/.cache/flower-large-batch/<dataset>/``, filled by step 3;
3. a download through flwr-datasets (Hugging Face Hub) when the machine is online.

``digits`` is scikit-learn's bundled 8x8 digits and needs neither files nor network.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workloads.cache import cached_arrays
from workloads.errors import ConfigError, DataNotFoundError  # noqa: F401 - DataNotFoundError is raised here
from workloads.files import atomic_write_bytes
from workloads.node_files import eval_only_arrays

VAL_SPLIT_SEED = 2509  # fixed: the validation split is the same for every run seed
DIGITS_TEST_FRACTION = 0.2  # scikit-learn's digits ship without a test split
HUB_IDS = {"cifar10": ("uoft-cs/cifar10", "img"), "mnist": ("ylecun/mnist", "image")}


@dataclass(frozen=True)
class RawData:
    """A dataset as loaded: uint8 images in NCHW layout and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    max_value: float  # the value of a white pixel (255, or 16 for digits)


@dataclass(frozen=True)
class Splits:
    """Train/validation/test tensors of one dataset, with normalisation constants.

    ``x_*`` are uint8 NCHW tensors; ``y_*`` are int64. ``mean`` and ``std`` have shape
    (C, 1, 1) and are measured on the training split, after scaling pixels to [0, 1].
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    max_value: float

    def inputs(self, x: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Convert a uint8 batch to normalised float32 on ``device``."""
        x = x.to(device, non_blocking=True).float().div_(self.max_value)
        return x.sub_(self.mean.to(device)).div_(self.std.to(device))


def resolve_data_dir(data_dir: str) -> Path | None:
    """Return the folder to read from: run config, then $FLB_DATA_DIR, else None.

    Raises
    ------
    ConfigError
        When a folder is named but does not exist.
    """
    key, value = ("data-dir", data_dir) if data_dir else ("FLB_DATA_DIR", os.environ.get("FLB_DATA_DIR", ""))
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"run-config key '{key}' = '{value}': folder does not exist. Allowed: a folder "
            "holding cifar10/ and/or mnist/ with the .npz archives, or '' to download "
            "through flwr-datasets."
        )
    return path.resolve()


def cache_dir() -> Path:
    """Return the per-user cache folder that downloads are written to."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "flower-large-batch"


def find_archives(name: str, data_dir: str = "") -> tuple[Path | None, list[str]]:
    """The folder holding ``name``'s archives (data dir, then the download cache), and where it looked."""
    folder = resolve_data_dir(data_dir)
    searched = []
    for root in ([folder] if folder else []) + [cache_dir()]:
        for candidate in (root / name, root):
            if _has_archives(name, candidate):
                return candidate, searched
            searched.append(str(candidate))
    return None, searched


def load_raw(name: str, data_dir: str = "") -> RawData:
    """Load a dataset's official train and test splits (see the module docstring)."""
    if name == "digits":
        return _load_digits()
    folder, searched = find_archives(name, data_dir)
    if folder is not None:
        return _load_npz(name, folder)
    try:
        raw = _download(name)
    except Exception as err:  # noqa: BLE001 - any failure means "offline": explain what to do
        raise DataNotFoundError(
            f"dataset '{name}' was not found in {', '.join(dict.fromkeys(searched))} and "
            f"could not be downloaded through flwr-datasets ({type(err).__name__}: {err}). "
            f"Offline: pass --run-config \"data-dir='/abs/path'\" (or set FLB_DATA_DIR) to a "
            f"folder holding {name}/ with the .npz archives (x uint8, y uint8). Online: leave "
            "data-dir empty and make sure huggingface.co is reachable."
        ) from err
    _write_cache(name, raw)
    return raw


def source_key(name: str, data_dir: str = "") -> dict | None:
    """What a dataset's decoded arrays depend on: the archives' names, sizes and times (None: not on disk)."""
    if name == "digits":
        from importlib.metadata import version

        return {"sklearn": version("scikit-learn")}
    folder, _ = find_archives(name, data_dir)
    if folder is None:
        return None
    files = sorted(p for p in folder.glob("*.npz") if p.is_file())
    return {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


@functools.lru_cache(maxsize=4)
def load_splits(name: str, data_dir: str = "", val_fraction: float = 0.1, train_limit: int = 0) -> Splits:
    """Load a dataset once per process and split a validation set off its training split.

    The validation examples are drawn with a fixed seed (``VAL_SPLIT_SEED``), so the split
    does not depend on the run seed and tuning on it is comparable across seeds. With
    ``train_limit`` > 0, a fixed random subset of that many training examples is kept (the
    validation and test splits are unchanged).

    The decoded splits are cached on disk (workloads/cache.py) and memory-mapped by every
    later process: a fresh ClientApp process or Ray actor loads them in milliseconds. A
    ``data-dir`` holding only ``<name>/eval.npz`` (``python -m deploy.split_data``: node-local
    data) gives the server's evaluation splits with an empty training split.
    """
    if (eval_arrays := eval_only_arrays(resolve_data_dir(data_dir), name, val_fraction, train_limit)) is not None:
        return splits_from_arrays(eval_arrays)
    key = source_key(name, data_dir)
    if key is None:  # not on disk yet: download (into the cache folder), then key it
        load_raw(name, data_dir)
        key = source_key(name, data_dir)
    arrays = cached_arrays("splits", {"dataset": name, "source": key, "val_fraction": val_fraction,
                                      "train_limit": train_limit},
                           lambda: split_arrays(load_raw(name, data_dir), val_fraction, train_limit))
    return splits_from_arrays(arrays)


def split_arrays(raw: RawData, val_fraction: float, train_limit: int) -> dict[str, np.ndarray]:
    """The train/validation/test arrays and normalisation constants of ``load_splits``."""
    order = np.random.default_rng(VAL_SPLIT_SEED).permutation(len(raw.y_train))
    n_val = max(1, round(val_fraction * len(order)))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    if 0 < train_limit < len(train):
        train = np.sort(np.random.default_rng(VAL_SPLIT_SEED + 2).permutation(train)[:train_limit])
    x_train = np.ascontiguousarray(raw.x_train[train])
    mean, std = _channel_stats(torch.from_numpy(x_train), raw.max_value)
    return {"x_train": x_train, "y_train": raw.y_train[train].astype(np.int64),
            "x_val": np.ascontiguousarray(raw.x_train[val]), "y_val": raw.y_train[val].astype(np.int64),
            "x_test": np.ascontiguousarray(raw.x_test), "y_test": raw.y_test.astype(np.int64),
            "mean": mean.numpy(), "std": std.numpy(), "max_value": np.asarray(raw.max_value)}


def splits_from_arrays(a: dict[str, np.ndarray]) -> Splits:
    """Wrap arrays (memory-mapped or not) as a ``Splits`` without copying."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in a.items() if k != "max_value"}
    return Splits(t["x_train"], t["y_train"], t["x_val"], t["y_val"], t["x_test"], t["y_test"],
                  t["mean"], t["std"], float(a["max_value"]))


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad`` pixels of zero padding, then random horizontal flip.

    Vectorised over the batch: one padded copy, one gather of shifted windows.
    """
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def _channel_stats(x: torch.Tensor, max_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], in float64 chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in x.split(4096):
        c = chunk.to(torch.float64) / max_value
        total += c.sum(dim=(0, 2, 3))
        total_sq += (c * c).sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float().view(-1, 1, 1), std.float().view(-1, 1, 1)


def _load_digits() -> RawData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.uint8).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(VAL_SPLIT_SEED + 1).permutation(len(y))
    n_test = round(DIGITS_TEST_FRACTION * len(y))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return RawData(x[train], y[train], x[test], y[test], max_value=16.0)


def _archive_names(name: str) -> tuple[list[str], list[str]]:
    if name == "cifar10":
        return [f"train_{k}.npz" for k in range(1, 6)], ["train.npz"]
    return ["train.npz"], ["train.npz"]


def _has_archives(name: str, folder: Path) -> bool:
    if not (folder / "test.npz").is_file():
        return False
    split_parts, single = _archive_names(name)
    return all((folder / f).is_file() for f in split_parts) or all(
        (folder / f).is_file() for f in single
    )


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return z["x"], z["y"]


def _to_nchw(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:  # (N, H, W) grayscale
        return x[:, None, :, :]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, H, W, C) -> NCHW


def _load_npz(name: str, folder: Path) -> RawData:
    split_parts, single = _archive_names(name)
    files = split_parts if all((folder / f).is_file() for f in split_parts) else single
    parts = [_read_npz(folder / f) for f in files]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts]).astype(np.int64)
    x_test, y_test = _read_npz(folder / "test.npz")
    return RawData(_to_nchw(x_train), y_train, _to_nchw(x_test), y_test.astype(np.int64), 255.0)


def _download(name: str) -> RawData:
    """Download the official splits through flwr-datasets and convert them to arrays."""
    if name not in HUB_IDS:
        raise DataNotFoundError(f"no download source for dataset '{name}'")
    from flwr_datasets import FederatedDataset

    hub_id, image_key = HUB_IDS[name]
    fds = FederatedDataset(dataset=hub_id, partitioners={"train": 1}, shuffle=False)
    arrays = []
    for split in ("train", "test"):
        ds = fds.load_split(split)
        x = np.stack([np.asarray(img, dtype=np.uint8) for img in ds[image_key]])
        arrays += [x, np.asarray(ds["label"], dtype=np.int64)]
    return RawData(_to_nchw(arrays[0]), arrays[1], _to_nchw(arrays[2]), arrays[3], 255.0)


def _write_cache(name: str, raw: RawData) -> None:
    """Store a download in the offline layout, atomically, so the next run needs no network."""
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        x_hwc = x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)
        buf = io.BytesIO()
        np.savez_compressed(buf, x=x_hwc, y=y.astype(np.uint8))
        atomic_write_bytes(folder / f"{split}.npz", buf.getvalue())
