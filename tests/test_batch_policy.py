"""Batch policies (strategies/batch_policy.py) in a real in-process simulation, and their math."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from client_app.job import get_job
from estimators.performance import KneeModel, choose_batch
from flb.inprocess import run_inprocess
from strategies.batch_policy import ClientCapacity, memory_max_plan, optimal_plan
from workloads.config import ConfigError, RunConfig

BASE = {"model": "cnn", "num-server-rounds": 4, "eval-every": 100, "seed": 1,
        "device-profiles": "phone:1.5:0.25:20:60,tablet:3:0.5:50:30,laptop:0:1:100:10"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, **extra):
    out = tmp_path / extra["batch-policy"]
    rounds = pd.read_csv(run_inprocess(BASE | extra | {"out-dir": str(out)}, num_clients=3) / "rounds.csv")
    return rounds, pd.read_csv(out / "clients.csv"), json.loads((out / "batch_plan.json").read_text())


def test_memory_max_runs_every_client_at_its_limit(tmp_path):
    rounds, clients, plan = _run(tmp_path, **{"batch-policy": "memory-max"})
    limits = {c["partition_id"]: c["max_batch"] for c in plan["clients"]}
    cfg = RunConfig.from_mapping(json.loads((tmp_path / "memory-max" / "config.json").read_text())["run_config"])
    laptop_partition = len(get_job(cfg, 2, 3).partition)
    assert limits[0] < limits[1] < limits[2] == laptop_partition  # phone < tablet < laptop (unlimited: its partition)
    assert (clients["local_batch"] == clients["partition_id"].map(limits)).all()
    assert (rounds["global_batch"].iloc[1:] == sum(limits.values())).all()
    # the probe's time on the slowest device is on the virtual clock before round 1
    assert plan["probe_virtual_s"] > 0
    first = rounds.set_index("round").loc[1]
    # rounds.csv keeps 6 significant digits, so compare at that precision
    assert first["virtual_total_s"] == pytest.approx(plan["probe_virtual_s"] + first["virtual_s"], rel=1e-5)
    assert (clients["micro_batch"] == clients["local_batch"]).all()  # the limit is a single pass
    limited = clients[clients["budget_mb"] > 0].dropna(subset=["peak_mem_mb"])
    assert set(limited["round"]) == {1, 4}  # measured in the first and last round (memory-check-every=0)
    assert (limited["peak_mem_mb"] < limited["budget_mb"]).all()


def test_optimal_calibrates_then_follows_its_choice(tmp_path):
    rounds, clients, plan = _run(tmp_path, **{"batch-policy": "optimal", "calibration-rounds": 2,
                                              "global-batch-size": 150})
    assert (rounds["global_batch"].iloc[1:3] == 150).all()  # calibration at the fixed batch
    assert plan["noise_measured"] and plan["noise_scale"] > 0
    assert (rounds["global_batch"].iloc[3:] == plan["global_batch"]).all()
    split = {int(k): v for k, v in plan["split"].items()}
    later = clients[clients["round"] > 2]
    assert (later["local_batch"] == later["partition_id"].map(split)).all()  # plans are keyed by partition
    best = min(plan["candidates"], key=lambda c: c["rel_time"])
    assert best["B"] == plan["global_batch"]


def _capacity(node: int, speed: float, limit: int, comm: float) -> ClientCapacity:
    return ClientCapacity(node, node, limit, KneeModel(0.001, 0.002, 1e-4 / speed, 2.0, 1.0), comm, 0.0)


def test_plans_from_capacities():
    caps = [_capacity(1, 1.0, 500, 0.05), _capacity(2, 0.25, 100, 0.2), _capacity(3, 0.5, 300, 0.1)]
    assert memory_max_plan(caps) == {1: 500, 2: 100, 3: 300}
    plan, choice = optimal_plan(caps, noise_scale=400.0, server_s=0.01, objective="time")
    direct = choose_batch([c.step_model for c in caps], [c.comm_s for c in caps], [500, 100, 300], 400.0, 0.01)
    assert sum(plan.values()) == choice.global_batch == direct.global_batch
    assert all(plan[c.node_id] <= c.max_batch for c in caps)


def test_bad_policy_names_the_key():
    with pytest.raises(ConfigError, match=r"batch-policy.*'largest'"):
        RunConfig.from_mapping({"batch-policy": "largest"})
