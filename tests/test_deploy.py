"""A real deployment on 127.0.0.1: SuperLink and 3 SuperNodes with TLS and SuperNode authentication."""

from __future__ import annotations

import csv
import json

from deploy.local import rehearse
from flb.launch.run import prepare


def test_tls_authenticated_deployment_runs_and_refuses_an_unregistered_node(tmp_path):
    cfg, _, out, _ = prepare("num-server-rounds=3 eval-every=3 round-timeout-s=60", "num-supernodes=3",
                             str(tmp_path / "results"))
    code, events = rehearse(cfg, 3, tmp_path / "work", insecure=False, node_data=True, quiet=True, intruder=True)
    assert code == 0, (out / "run.log").read_text()[-3000:]
    intruder = events["intruder"]
    assert intruder["refused"] and intruder["exit_code"] != 0 and intruder["online_unchanged"], intruder
    with open(out / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert all(int(r["global_batch"]) == 256 and int(r["failed_clients"]) == 0 for r in rows[1:])
    assert float(rows[-1]["test_accuracy"]) > 0.3
    with open(out / "clients.csv") as f:
        assert sorted({int(c["partition_id"]) for c in csv.DictReader(f)}) == [0, 1, 2]
    assert (out / "model.pt").exists() and json.loads((out / "config.json").read_text())["model"] == "mlp"
    # node-local data: each node had only its partition, the server only the evaluation split
    assert "server" in json.loads((out / "config.json").read_text())["run_config"]["data-dir"]
    assert (tmp_path / "work" / "state.db").exists()  # the SuperLink's persistent state
