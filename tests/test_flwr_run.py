"""One real ``flwr run`` through the launcher, and a failing run judged as failed."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from experiments.inprocess import run_inprocess
from experiments.run import launch, prepare
from tests.conftest import REPO_ROOT


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_launcher_runs_flwr_and_writes_results(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--out", str(out),
         "--run-config", "num-server-rounds=3 eval-every=1 global-batch-size=64 warmup-rounds=0",
         "--federation-config", "num-supernodes=4"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == str(out)
    assert any("finished:completed" in line for line in lines)
    pid = int(re.search(r"SuperLink pid (\d+)", res.stdout).group(1))
    assert not _pid_alive(pid), "the launcher left its SuperLink running"

    with open(out / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert [int(r["samples_seen"]) for r in rows] == [0, 64, 128, 192]
    assert all(int(r["global_batch"]) == 64 for r in rows[1:])
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"]) + 0.1  # it learns
    assert float(rows[3]["train_loss"]) < float(rows[1]["train_loss"])
    with open(out / "clients.csv") as f:
        clients = list(csv.DictReader(f))
    assert len(clients) == 12 and {int(c["partition_id"]) for c in clients} == {0, 1, 2, 3}
    assert all(int(c["local_batch"]) == 16 for c in clients)
    config = json.loads((out / "config.json").read_text())
    assert config["run_config"]["global-batch-size"] == 64 and config["model"] == "mlp"
    state = torch.load(out / "model.pt")
    assert set(state) == {"1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"}
    assert "[round 3/3]" in (out / "run.log").read_text()

    # The same config in one process (no Ray) gives the same numbers: only transport differs.
    local = run_inprocess({"num-server-rounds": 3, "eval-every": 1, "global-batch-size": 64,
                           "warmup-rounds": 0, "out-dir": str(tmp_path / "local")}, num_clients=4)
    for col in ("train_loss", "test_loss", "test_accuracy"):
        ray_values = [float(r[col]) for r in rows[1:]]
        assert local[col].iloc[1:].tolist() == pytest.approx(ray_values, rel=1e-4), col


def test_failed_run_is_reported_as_failure(tmp_path):
    cfg, fed, out = prepare("num-server-rounds=2", "num-supernodes=2", str(tmp_path / "fail"))
    # Bypass the launcher's own pre-check to make the clients fail inside Flower.
    cfg = cfg.replace(global_batch_size=5000)
    assert launch(cfg, fed, out, quiet=True) == 1
    assert "exceeds its partition" in (out / "run.log").read_text()
