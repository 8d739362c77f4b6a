"""Client partitions of the training split, computed with flwr-datasets partitioners.

The partitioners run on an in-memory ``datasets.Dataset`` of the training labels and an
index column, so a partition is an index tensor into the shared uint8 training tensor.
Every process (the server for its checks, each client actor) computes the same split from
the same seed, once, and caches it.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from workloads.cache import cached_arrays
from workloads.errors import ConfigError

MIN_PARTITION_SIZE = 10  # DirichletPartitioner resamples until every client has this many


@functools.lru_cache(maxsize=8)
def partition_indices(
    labels: bytes,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    seed: int,
) -> tuple[np.ndarray, ...]:
    """Split example indices ``0..N-1`` into client partitions, through the on-disk array cache.

    The split (``_compute_partitions``) imports ``datasets`` and flwr-datasets, about 2 s in a
    fresh process; cached, a fresh ClientApp process reads it in milliseconds.
    """
    key = {"labels": hashlib.sha256(labels).hexdigest(), "num_partitions": num_partitions, "partitioner": partitioner,
           "alpha": alpha if partitioner == "dirichlet" else None, "seed": seed}

    def build() -> dict[str, np.ndarray]:
        parts = _compute_partitions(labels, num_partitions, partitioner, alpha, seed)
        return {"indices": np.concatenate(parts), "sizes": np.asarray([len(p) for p in parts], dtype=np.int64)}

    arrays = cached_arrays("partitions", key, build)
    bounds = np.concatenate([[0], np.cumsum(arrays["sizes"])])
    return tuple(np.asarray(arrays["indices"][bounds[i]:bounds[i + 1]]) for i in range(num_partitions))


def _compute_partitions(
    labels: bytes,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    seed: int,
) -> tuple[np.ndarray, ...]:
    """Split example indices ``0..N-1`` into ``num_partitions`` sorted int64 index arrays.

    ``labels`` are the training labels as int64 bytes (hashable, for the cache). ``iid``: a
    seeded shuffle, then equal contiguous shards; ``dirichlet``: per-class proportions drawn from
    Dirichlet(``alpha``) (flwr-datasets' ``DirichletPartitioner``; smaller is more skewed).
    Together the partitions cover every index once.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    y = np.frombuffer(labels, dtype=np.int64)
    if num_partitions < 1 or num_partitions > len(y):
        raise ConfigError(
            f"num-partitions = {num_partitions}: must be between 1 and the number of "
            f"training examples ({len(y)})."
        )
    order = np.random.default_rng(seed).permutation(len(y))  # IidPartitioner shards in order
    ds = Dataset.from_dict({"label": y[order].tolist(), "idx": order.tolist()})
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min(MIN_PARTITION_SIZE, len(y) // num_partitions),
            self_balancing=False,
            seed=seed,
        )
    else:
        raise ConfigError(
            f"run-config key 'partitioner' = {partitioner!r} is not allowed. Allowed: iid, dirichlet."
        )
    part.dataset = ds
    try:
        parts = [np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64)) for i in range(num_partitions)]
    except ValueError as err:
        raise ConfigError(
            f"run-config key 'dirichlet-alpha' = {alpha}: flwr-datasets could not give each of "
            f"{num_partitions} clients at least {MIN_PARTITION_SIZE} examples ({err}). "
            "Allowed: a larger alpha or fewer clients."
        ) from err
    return tuple(parts)


def client_partition(
    labels: np.ndarray, partition_id: int, num_partitions: int, partitioner: str, alpha: float, seed: int
) -> np.ndarray:
    """Return the sorted training indices of one client."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"node-config key 'partition-id' = {partition_id}: must be in [0, {num_partitions})."
        )
    parts = partition_indices(
        np.ascontiguousarray(labels, dtype=np.int64).tobytes(), num_partitions, partitioner, alpha, seed
    )
    return parts[partition_id]


def partition_sizes(labels: np.ndarray, num_partitions: int, partitioner: str, alpha: float, seed: int) -> list[int]:
    """Return the number of training examples of every client."""
    parts = partition_indices(
        np.ascontiguousarray(labels, dtype=np.int64).tobytes(), num_partitions, partitioner, alpha, seed
    )
    return [len(p) for p in parts]
