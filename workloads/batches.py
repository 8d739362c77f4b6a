"""Splitting a global batch over the round's clients, and checking that the local batches fit the partitions."""

from __future__ import annotations

from workloads.errors import ConfigError


def split_global_batch(global_batch: int, num_clients: int) -> list[int]:
    """Split a global batch B into K local batches b_i that differ by at most one.

    Parameters
    ----------
    global_batch : int
        B, examples per global step.
    num_clients : int
        K, clients in the round.

    Returns
    -------
    list[int]
        b_1..b_K with sum B; the first ``B mod K`` clients get one extra example.
    """
    if num_clients < 1 or global_batch < num_clients:
        raise ConfigError(
            f"run-config key 'global-batch-size' = {global_batch}: must be at least the "
            f"number of clients in the round ({num_clients})."
        )
    base, extra = divmod(global_batch, num_clients)
    return [base + (1 if i < extra else 0) for i in range(num_clients)]


def check_batches_fit(local_batches: list[int], partition_sizes: list[int]) -> None:
    """Raise ConfigError when the largest local batch exceeds the smallest partition."""
    largest, smallest = max(local_batches), min(partition_sizes)
    if largest > smallest:
        raise ConfigError(
            f"run-config key 'global-batch-size' = {sum(local_batches)}: a local batch of {largest} examples is "
            f"larger than the smallest client partition ({smallest} examples; sizes "
            f"{sorted(partition_sizes)[:8]}...). Allowed: global-batch-size <= "
            f"{smallest * len(local_batches)} for {len(local_batches)} clients, or more "
            "data per client (fewer supernodes, a larger dirichlet-alpha)."
        )
