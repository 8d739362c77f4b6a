"""One real ``flwr run`` through the launcher, and a failing run judged as failed."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from flb.inprocess import run_inprocess
from flb.launch.run import launch, prepare
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
        [sys.executable, "-m", "flb.launch", "--out", str(out),
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
    local = pd.read_csv(run_inprocess({"num-server-rounds": 3, "eval-every": 1, "global-batch-size": 64,
                                       "warmup-rounds": 0, "out-dir": str(tmp_path / "local")}, num_clients=4) / "rounds.csv")
    for col in ("train_loss", "test_loss", "test_accuracy"):
        ray_values = [float(r[col]) for r in rows[1:]]
        assert local[col].iloc[1:].tolist() == pytest.approx(ray_values, rel=1e-4), col


def test_failed_run_is_reported_as_failure(tmp_path):
    cfg, fed, out, _ = prepare("num-server-rounds=2", "num-supernodes=2", str(tmp_path / "fail"))
    # Bypass the launcher's own pre-check to make the clients fail inside Flower.
    cfg = cfg.replace(global_batch_size=5000)
    assert launch(cfg, fed, out, quiet=True) == 1
    assert "exceeds its partition" in (out / "run.log").read_text()


@pytest.mark.parametrize("nodes, packed", [(4, ""), (2, "virtual-clients=4 ")], ids=["node-per-client", "virtual-clients"])
def test_one_failing_client_does_not_stop_a_run_with_min_batch_fraction(tmp_path, nodes, packed):
    # partition 3's device is too small for its batch: it fails every round; 75% of the batch arrives.
    # With virtual clients, partitions 2 and 3 share a Flower node's bundle: only 3 fails.
    out = tmp_path / "partial"
    res = subprocess.run(
        [sys.executable, "-m", "flb.launch", "--out", str(out), "--federation-config", f"num-supernodes={nodes}",
         "--run-config", f"{packed}num-server-rounds=3 eval-every=3 global-batch-size=64 min-batch-fraction=0.75 "
                         "device-profiles='big:0,big:0,big:0,watch:0.2'"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "1 of 4 clients will fail every round" in res.stderr  # the pre-flight warning
    with open(out / "rounds.csv") as f:
        rows = list(csv.DictReader(f))[1:]
    assert [(int(r["planned_batch"]), int(r["global_batch"]), int(r["failed_clients"])) for r in rows] == [(64, 48, 1)] * 3
    with open(out / "failures.csv") as f:
        failures = list(csv.DictReader(f))
    assert [int(f["partition_id"]) for f in failures] == [3, 3, 3]
    assert all("'watch' = 0.2 MiB is too small" in f["reason"] for f in failures)


def test_sigkill_then_resume_ends_with_the_uninterrupted_model(tmp_path, one_thread):
    """A run killed (SIGKILL, the whole process tree) after round 5 and resumed equals the uninterrupted run.

    The reference is the same config in one process with one torch thread, as a Ray actor with
    client-resources-num-cpus=1 has: the two are bit-identical (ordering by partition id).
    """
    from flb.launch.run import parse_pairs
    from flb.launch.superlink import descendants

    out = tmp_path / "killed"
    rc = "num-server-rounds=16 checkpoint-every=2 eval-every=4 global-batch-size=64 clients-per-round=3 teacher=noise"
    proc = subprocess.Popen([sys.executable, "-m", "flb.launch", "--out", str(out), "--run-config", rc,
                             "--federation-config", "num-supernodes=4"], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _last_round(out) < 5:
        assert time.monotonic() < deadline and proc.poll() is None, "the run did not reach round 5"
        time.sleep(0.05)
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    killed_after = torch.load(out / "checkpoint.pt")["round"]  # rounds take ~0.1 s: wherever the kill landed
    assert killed_after % 2 == 0 and 4 <= killed_after < 16
    res = subprocess.run([sys.executable, "-m", "flb.launch", "--resume", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed" in res.stdout

    run_inprocess(parse_pairs(rc) | {"out-dir": str(tmp_path / "reference")}, num_clients=4)
    resumed, reference = torch.load(out / "model.pt"), torch.load(tmp_path / "reference" / "model.pt")
    assert max(float((resumed[k] - reference[k]).abs().max()) for k in resumed) == 0.0
    with open(out / "rounds.csv") as f:
        assert [int(r["round"]) for r in csv.DictReader(f)] == list(range(17))  # no duplicated rows
    log = (out / "run.log").read_text()
    # The resumed run's rounds are all logged, line by line, without colours. (The killed run's lines
    # are streamed by `flwr log` from the killed launcher: a kill may land before they arrive.)
    assert f"[round {killed_after + 1}/16]" in log and "[round 16/16]" in log and "\x1b[" not in log
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in out.iterdir() if p.is_file())


def _last_round(out) -> int:
    try:
        with open(out / "rounds.csv") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return -1
    return int(rows[-1]["round"]) if rows else -1
