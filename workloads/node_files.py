"""The files of node-local data (workloads/node_data.py): their format, written atomically, checked on read.

Each ``.npz`` carries the settings it was cut with (``meta``); a run with other settings is
refused, naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from workloads.cache import cached_arrays
from workloads.errors import ConfigError

META_KEYS = ("dataset", "val_fraction", "train_limit", "partitioner", "dirichlet_alpha", "seed", "num_partitions")


def save_node_file(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.asarray(json.dumps(meta)), **arrays)
    tmp.replace(path)


def read_node_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The file's arrays (through the array cache) and its meta."""
    stat = path.stat()

    def build() -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    arrays = cached_arrays("node-data", {"file": str(path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns}, build)
    meta = json.loads(str(arrays.pop("meta")))
    return arrays, meta


def check_meta(meta: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    for key in META_KEYS:
        if key in expected and expected[key] is not None and meta.get(key) != expected[key]:
            raise ConfigError(
                f"{where} was cut with {key.replace('_', '-')} = {meta.get(key)!r}, but this run has "
                f"{expected[key]!r}. Allowed: the same settings, or a new export (python -m deploy.split_data)."
            )


def eval_only_arrays(folder: Path | None, name: str, val_fraction: float, train_limit: int) -> dict[str, np.ndarray] | None:
    """The server's splits from ``<folder>/<name>/eval.npz`` (empty training split), or None if there is none."""
    path = folder / name / "eval.npz" if folder else None
    if path is None or not path.is_file():
        return None
    arrays, meta = read_node_file(path)
    check_meta(meta, {"dataset": name, "val_fraction": val_fraction, "train_limit": train_limit}, f"run-config key 'data-dir' = '{folder}'")
    shape = arrays["x_val"].shape[1:]
    return {"x_train": np.zeros((0, *shape), np.uint8), "y_train": np.zeros(0, np.int64), **arrays}
