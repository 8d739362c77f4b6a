"""Node-local data: nodes hold only their partitions, the server only its evaluation split; same results."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch

from deploy.split_data import main as split_data
from flb.inprocess import run_inprocess
from workloads.errors import ConfigError

BASE = {"num-server-rounds": 4, "eval-every": 2, "global-batch-size": 96, "clients-per-round": 2}


def test_node_local_data_gives_the_shared_data_run(tmp_path):
    assert split_data(["--nodes", "3", "--out", str(tmp_path / "data"), "--run-config", "global-batch-size=96"]) == 0
    run_inprocess(BASE | {"out-dir": str(tmp_path / "shared")}, num_clients=3)
    nodes = [{"data-dir": str(tmp_path / "data" / f"node-{i}")} for i in range(3)]  # no partition-id: from the file
    run_inprocess(BASE | {"out-dir": str(tmp_path / "local"), "data-dir": str(tmp_path / "data" / "server")},
                  num_clients=3, node_configs=nodes)
    a, b = torch.load(tmp_path / "shared" / "model.pt"), torch.load(tmp_path / "local" / "model.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    sizes = [len(__import__("numpy").load(tmp_path / "data" / f"node-{i}" / "digits" / "partition.npz")["y"]) for i in range(3)]
    assert sum(sizes) == 1294 and max(sizes) - min(sizes) <= 1  # each node holds only its share


def test_a_node_folder_cut_for_other_settings_is_refused(tmp_path, caplog):
    split_data(["--nodes", "2", "--out", str(tmp_path / "data")])
    nodes = [{"data-dir": str(tmp_path / "data" / f"node-{i}")} for i in range(2)]
    with pytest.raises(Exception, match=r"node-config key 'data-dir' = .* was cut with seed = 0, but this run has 3"):
        run_inprocess(BASE | {"seed": 3, "out-dir": str(tmp_path / "o"), "data-dir": str(tmp_path / "data" / "server")},
                      num_clients=2, node_configs=nodes)
    # one node of two refuses: the run goes on with the other, and the log names the refusal
    bad = [{"data-dir": str(tmp_path / "data" / "node-0"), "partition-id": 1}, nodes[1]]
    caplog.set_level(logging.WARNING)
    out = run_inprocess(BASE | {"out-dir": str(tmp_path / "p"), "data-dir": str(tmp_path / "data" / "server")},
                        num_clients=2, node_configs=bad)
    assert "holds partition 0, but node-config key 'partition-id' = 1" in caplog.text
    assert set(pd.read_csv(out / "clients.csv")["partition_id"]) == {1}
    with pytest.raises(ConfigError, match="--nodes = 0"):
        raise ConfigError("--nodes = 0: need at least 1") if split_data(["--nodes", "0", "--out", str(tmp_path / "z")]) == 2 else None
