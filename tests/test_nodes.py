"""Which node holds which partition: duplicates, gaps, silent nodes, quarantine, deterministic sampling."""

from __future__ import annotations

import numpy as np
from flwr.app import Error, Message, MetricRecord, RecordDict

from flb.inprocess import delivered
from strategies.nodes import NodeDirectory, sample_nodes


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


def test_a_lazy_directory_asks_nobody_and_learns_partitions_from_replies():
    directory = NodeDirectory()
    assert directory.decide(5000, sampling=True, fixed_batches=True) and directory.lazy
    grid = ClaimsGrid({})
    usable = directory.refresh(grid, [30, 10, 20], 1.0)
    assert grid.asked == [] and usable == {30: -3, 20: -2, 10: -1}  # distinct keys below zero, by node id
    assert directory.learn(20, 7, -1) is None and directory.learn(20, 7, -1) is None
    assert directory.learn(30, 7, -1) == "partition-id = 7 is already node 20's"
    assert directory.refresh(grid, [30, 10, 20], 1.0) == {30: -3, 10: -1, 20: 7}
    eager = NodeDirectory()
    assert not eager.decide(1000, sampling=True, fixed_batches=True)  # up to IDENTIFY_ALL_MAX nodes: ask them all
    assert not NodeDirectory().decide(5000, sampling=False, fixed_batches=True)
    assert not NodeDirectory().decide(5000, sampling=True, fixed_batches=False)  # batch plans are per partition


def test_a_lazy_run_sends_no_identify_and_records_the_true_partitions(tmp_path, monkeypatch):
    import pandas as pd

    import strategies.nodes
    from client_app.app import app
    from flb.inprocess import run_inprocess

    monkeypatch.setattr(strategies.nodes, "IDENTIFY_ALL_MAX", 4)
    kinds = []

    def counting(msg, context):
        kinds.append(msg.metadata.message_type)
        return app(msg, context)

    config = {"num-server-rounds": 4, "eval-every": 4, "global-batch-size": 48, "clients-per-round": 3,
              "out-dir": str(tmp_path)}
    clients = pd.read_csv(run_inprocess(config, num_clients=10, client_app=counting) / "clients.csv")
    assert "query.identify" not in kinds and kinds.count("train") == 12
    assert (clients.partition_id == clients.node_id - 1000).all()  # InProcessGrid: node 1000 + i holds partition i
    assert clients.groupby("round").size().tolist() == [3, 3, 3, 3] and (clients.local_batch == 16).all()


def test_fewer_nodes_than_clients_per_round_shrink_the_round_and_none_is_not_a_config_error(monkeypatch):
    import pytest
    import torch

    import strategies.large_batch as lb
    from flb.inprocess import FakeGrid
    from strategies.teachers import IdentityTeacher
    from workloads.config import RunConfig
    from workloads.errors import ConfigError

    monkeypatch.setattr(lb, "NODE_WAIT_S", 0.3)
    cfg = RunConfig.from_mapping({"clients-per-round": 3, "global-batch-size": 30})
    model = {"w": torch.zeros(2, 2)}
    strategy = lb.LargeBatchStrategy(cfg, model, ["w"], IdentityTeacher())
    grid = FakeGrid([10, 11])  # 2 of the 3 wanted: the first round waits, then goes on with both
    messages = list(strategy.configure_train(1, lb.ArrayRecord(model), lb.ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [10, 11]
    assert sorted(b for _, b in strategy.plan.assigned.values()) == [15, 15]  # the global batch is kept
    grid.node_ids = [11]  # a SuperNode died for good: later rounds draw from the one that is left
    assert strategy._usable_nodes(grid) == ({11: 1}, 1)
    grid.node_ids = []
    with pytest.raises(lb.NodesUnavailable, match=r"no usable node for 0 s \(0 connected") as err:
        strategy._usable_nodes(grid)
    assert not isinstance(err.value, ConfigError)
