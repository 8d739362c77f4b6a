"""Shared fixtures: the offline data folder, and hand-built Flower messages without Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Building an instruction Message outside a running Flower task needs a task identity.
    from flb.inprocess import set_task_identity

    set_task_identity()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never wait on the network


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The offline datasets: $FLB_DATA_DIR, else ../shared/data beside the checkout.

    Missing data skips the test, unless FLB_REQUIRE_DATA=1 (as in CI), where it fails.
    """
    candidates = [os.environ.get("FLB_DATA_DIR", ""), str(REPO_ROOT.parent / "shared" / "data")]
    for c in candidates:
        if c and (Path(c) / "cifar10").is_dir():
            return str(Path(c).resolve())
    msg = f"offline data not found in {candidates}; set FLB_DATA_DIR"
    if os.environ.get("FLB_REQUIRE_DATA") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a test module: kernels, and so bytes and times, as a simulated client's."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
