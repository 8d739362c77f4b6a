"""Which node holds which partition: duplicates, gaps, silent nodes, quarantine, deterministic sampling."""

from __future__ import annotations

import numpy as np
from flwr.app import Error, Message, MetricRecord, RecordDict

from strategies.nodes import NodeDirectory, sample_nodes
from flb.inprocess import delivered


class ClaimsGrid:
    """Answers identify queries with the given partition per node (None: silent, "error": an error reply)."""

    def __init__(self, claims: dict[int, object], num_partitions: int = 3) -> None:
        self.claims, self.num_partitions, self.asked = claims, num_partitions, []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.asked.append(node)
            claim = self.claims[node]
            if claim is None:
                continue
            if claim == "error":
                out.append(Message(Error(code=2, reason="no data here"), reply_to=delivered(m)))
                continue
            content = RecordDict({"metrics": MetricRecord({"partition-id": claim, "num-partitions": self.num_partitions})})
            out.append(Message(content, reply_to=delivered(m)))
        return out


def test_duplicates_gaps_and_silent_nodes(caplog):
    grid = ClaimsGrid({10: 0, 11: 0, 12: None, 13: "error"})
    directory = NodeDirectory()
    usable = directory.refresh(grid, [10, 11, 12, 13], timeout_s=1.0)
    assert usable == {10: 0}  # node 11 claims partition 0 too: only the lower id is used
    assert "both claim partition-id 0" in caplog.text and "partitions without a connected node: [1, 2]" in caplog.text
    assert directory.errors == {12: "no identify reply within 120 s", 13: "no data here"}
    grid.asked.clear()
    directory.refresh(grid, [10, 11, 12, 13], timeout_s=1.0)
    assert sorted(grid.asked) == [12, 13]  # identified nodes are not asked again


def test_a_node_that_missed_a_deadline_sits_out():
    directory = NodeDirectory()
    grid = ClaimsGrid({1: 0, 2: 1, 3: 2})
    assert directory.refresh(grid, [1, 2, 3], 1.0) == {1: 0, 2: 1, 3: 2}
    directory.quarantine(2)
    assert directory.refresh(grid, [1, 2, 3], 1.0) == {1: 0, 3: 2}
    directory.quarantined[2] = 0.0  # its time is up
    assert directory.refresh(grid, [1, 2, 3], 1.0) == {1: 0, 2: 1, 3: 2}


def test_sampling_depends_on_partitions_only():
    a = sample_nodes({5: 0, 6: 1, 7: 2, 8: 3}, 2, np.random.default_rng(4))
    b = sample_nodes({900: 0, 17: 1, 3: 2, 44: 3}, 2, np.random.default_rng(4))
    assert [{5: 0, 6: 1, 7: 2, 8: 3}[n] for n in a] == [{900: 0, 17: 1, 3: 2, 44: 3}[n] for n in b]
