"""Node-local data: every SuperNode holds only its own examples, the server only its evaluation split.

Real devices do not hold everyone's data. ``export_node_data`` (``python -m deploy.split_data``)
cuts a dataset the way a run would (the same validation split, ``train-limit``, partitioner,
``dirichlet-alpha`` and ``seed``) and writes

- ``<out>/server/<dataset>/eval.npz``: the validation and test splits and the normalisation
  constants (measured on the whole training split, as in a shared-data run);
- ``<out>/node-<i>/<dataset>/partition.npz``: partition i's training examples, in the order
  of its indices, with the same constants.

Give a node its folder with ``--node-config "data-dir='<out>/node-<i>'"``, and the server its
own with ``--run-config "data-dir='<out>/server'"``. A run on node-local data computes exactly
what the same run on the shared dataset computes (tests/test_node_data.py). Each file carries
the settings it was cut with (``meta``); a run with other settings is refused, naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workloads.data import load_splits, splits_from_arrays
from workloads.errors import ConfigError
from workloads.node_files import check_meta, read_node_file, save_node_file
from workloads.partition import client_partition



def _meta(cfg, num_partitions: int) -> dict[str, Any]:
    return {"dataset": cfg.dataset, "val_fraction": cfg.val_fraction, "train_limit": cfg.train_limit,
            "partitioner": cfg.partitioner, "dirichlet_alpha": cfg.dirichlet_alpha if cfg.partitioner == "dirichlet" else None,
            "seed": cfg.seed, "num_partitions": num_partitions}


def export_node_data(cfg, num_partitions: int, out: Path) -> list[Path]:
    """Write the server's evaluation file and one partition file per node; return their paths."""
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.train_limit)
    meta = _meta(cfg, num_partitions)
    common = {"mean": splits.mean.numpy(), "std": splits.std.numpy(), "max_value": np.asarray(splits.max_value)}
    paths = [out / "server" / cfg.dataset / "eval.npz"]
    save_node_file(paths[0], {"x_val": splits.x_val.numpy(), "y_val": splits.y_val.numpy(), "x_test": splits.x_test.numpy(),
                     "y_test": splits.y_test.numpy(), **common}, meta)
    labels = splits.y_train.numpy()
    for i in range(num_partitions):
        idx = client_partition(labels, i, num_partitions, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed)
        path = out / f"node-{i}" / cfg.dataset / "partition.npz"
        save_node_file(path, {"x": splits.x_train.numpy()[idx], "y": labels[idx], **common}, meta | {"partition_id": i})
        paths.append(path)
    return paths


def load_partition(node_dir: str, cfg, partition_id: int | None, num_partitions: int | None):
    """A node's own examples from ``<node_dir>/<dataset>/partition.npz``.

    Returns
    -------
    (Splits, partition_id, num_partitions)
        ``Splits`` whose training split is exactly this node's partition (validation and test
        empty), and the partition it was cut as.

    Raises
    ------
    ConfigError
        If the file is missing, or was cut with other settings than this run's, or for another
        partition than the node's ``partition-id``.
    """
    path = Path(node_dir).expanduser() / cfg.dataset / "partition.npz"
    if not path.is_file():
        raise ConfigError(f"node-config key 'data-dir' = '{node_dir}': no {cfg.dataset}/partition.npz there. "
                          "Allowed: a folder written by python -m deploy.split_data.")
    arrays, meta = read_node_file(path)
    where = f"node-config key 'data-dir' = '{node_dir}'"
    check_meta(meta, _meta(cfg, num_partitions) | {"num_partitions": num_partitions}, where)
    if partition_id is not None and meta["partition_id"] != partition_id:
        raise ConfigError(f"{where} holds partition {meta['partition_id']}, but node-config key 'partition-id' = "
                          f"{partition_id}. Allowed: the same partition, or leave partition-id out.")
    x, y = arrays.pop("x"), arrays.pop("y")
    empty_x, empty_y = np.zeros((0, *x.shape[1:]), np.uint8), np.zeros(0, np.int64)
    splits = splits_from_arrays({"x_train": x, "y_train": y, "x_val": empty_x, "y_val": empty_y, "x_test": empty_x,
                                 "y_test": empty_y, **arrays})
    return splits, int(meta["partition_id"]), int(meta["num_partitions"])
