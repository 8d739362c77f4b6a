"""A node-local cache of arrays, memory-mapped: decoded datasets, partitions, fitted memory models.

A SuperNode starts a fresh ClientApp process for every message, and every Ray actor of a
simulation loads the same data: without a cache, each decodes the dataset, recomputes its
partition (importing ``datasets``) and re-traces the memory estimator, seconds of work for
milliseconds of step. ``cached_arrays(kind, key, build)`` runs ``build`` once per key and
machine, stores its arrays as ``.npy`` files in ``<root>/<kind>/<digest>/``, and afterwards
returns them memory-mapped (copy-on-write): pages are shared between processes, and loading
costs a few milliseconds.

The root is ``$FLB_CACHE_DIR``, else the node-config key ``cache-dir`` (``set_root``), else
``$XDG_CACHE_HOME/flower-large-batch`` (``~/.cache/flower-large-batch``). A finished entry is
published with one directory rename, so concurrent writers never leave a torn entry; the
key (as ``key.json``) sits beside the arrays. Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
_root_override: Path | None = None


def set_root(path: str | os.PathLike | None) -> None:
    """Use ``path`` as the cache root in this process (None: back to the default)."""
    global _root_override
    _root_override = Path(path).expanduser() if path else None


def cache_root() -> Path:
    """The cache folder (see the module docstring)."""
    if os.environ.get("FLB_CACHE_DIR"):
        return Path(os.environ["FLB_CACHE_DIR"]).expanduser()
    if _root_override is not None:
        return _root_override
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flower-large-batch"


def digest(key: dict[str, Any]) -> str:
    """A stable short hash of a JSON-able key."""
    return hashlib.sha256(json.dumps({"format": FORMAT, **key}, sort_keys=True).encode()).hexdigest()[:24]


def cached_arrays(kind: str, key: dict[str, Any], build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays for ``key``: from the cache (memory-mapped), or built by ``build`` and stored first.

    Parameters
    ----------
    kind : str
        A sub-folder, e.g. ``"splits"``.
    key : dict
        Everything the arrays depend on (JSON-able).
    build : callable
        Returns the arrays (numpy, any dtype but object) when they are not cached.

    Returns
    -------
    dict[str, np.ndarray]
        Memory-mapped copy-on-write arrays (writable; writes never reach the file), or the
        freshly built arrays if the cache folder cannot be written.
    """
    folder = cache_root() / kind / digest(key)
    if (folder / "key.json").exists():
        try:
            return _load(folder)
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)  # a damaged entry: rebuild it
    arrays = build()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        for name, value in arrays.items():
            np.save(tmp / f"{name}.npy", np.asarray(value), allow_pickle=False)
        (tmp / "key.json").write_text(json.dumps({"format": FORMAT, **key}, sort_keys=True, indent=1))
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process published it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        return arrays
    return _load(folder)


def _load(folder: Path) -> dict[str, np.ndarray]:
    def one(path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="c", allow_pickle=False)
        except ValueError:  # an empty array cannot be memory-mapped
            return np.load(path, allow_pickle=False)

    return {p.stem: one(p) for p in sorted(folder.glob("*.npy"))}
