"""Shared fixtures: the offline data folder, and hand-built Flower messages without Ray."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, Message, Metadata, MessageType, RecordDict

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Building an instruction Message outside a running Flower task needs a task identity.
    # This is a private Flower API (flwr.supercore.task_identity); only tests use it.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
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


class FakeGrid:
    """The part of a Flower Grid the strategy uses outside a round: node ids and the identify query.

    Node ``node_ids[i]`` holds partition i of ``len(node_ids)``.
    """

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import MetricRecord

        replies = []
        for m in messages:
            assert m.metadata.message_type == "query.identify", m.metadata.message_type
            pid = self.node_ids.index(m.metadata.dst_node_id)
            content = RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-partitions": len(self.node_ids)})})
            replies.append(Message(content, reply_to=delivered(m)))
        return replies


def delivered(msg: Message) -> Message:
    """``msg`` as a ClientApp receives it: with the metadata the SuperLink would add."""
    md = msg.metadata
    return Message(
        content=msg.content,
        metadata=Metadata(
            run_id=1, message_id=f"m{md.dst_node_id}-{time.time_ns()}", src_node_id=1,
            dst_node_id=md.dst_node_id, reply_to_message_id="", group_id=md.group_id or "1",
            created_at=time.time(), ttl=3600.0, message_type=md.message_type or MessageType.TRAIN,
        ),
    )


def reply_via_client(client_app, msg: Message, ctx: Context) -> Message:
    """Deliver ``msg`` to the ClientApp the way a SuperNode does and return the reply."""
    return client_app(delivered(msg), ctx)


def client_context(node_id: int, partition_id: int, num_partitions: int, run_config: dict) -> Context:
    """A fresh ClientApp context as simulation builds it."""
    return Context(
        run_id=1, node_id=node_id, state=RecordDict(), run_config=dict(run_config),
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
    )


def state_arrays(state) -> ArrayRecord:
    return ArrayRecord({k: v.clone() for k, v in state.items()})


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a test module: kernels, and so bytes and times, as a simulated client's."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
