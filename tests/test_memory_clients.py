"""Memory-aware clients: budgets from device profiles, micro-batches that fit, an unchanged step.

A real in-process simulation (flb/inprocess.py: the ServerApp, strategy and ClientApp
as in ``flwr run``) of the CNN on digits, 3 clients with b_i = 100 each.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from flb.inprocess import run_inprocess
from workloads.devices import memory_budget_mb, parse_profiles
from workloads.errors import ConfigError

BASE = {"model": "cnn", "global-batch-size": 300, "num-server-rounds": 2, "eval-every": 100, "warmup-rounds": 0,
        "momentum": 0.9, "seed": 3}
PROFILES = "small:1.5,medium:3,large:0"  # MiB; 0 = unlimited


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, name: str, **extra) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    out = tmp_path / name
    run_inprocess(BASE | extra | {"out-dir": str(out)}, num_clients=3)
    return pd.read_csv(out / "clients.csv"), torch.load(out / "model.pt")


def test_three_budgets_fit_and_leave_the_step_unchanged(tmp_path):
    clients, with_budgets = _run(tmp_path, "profiles", **{"device-profiles": PROFILES})
    _, unlimited = _run(tmp_path, "unlimited")

    assert len(clients) == 6 and (clients["local_batch"] == 100).all()
    budget = clients.groupby("partition_id")["budget_mb"].first().to_dict()
    assert budget == {0: 1.5, 1: 3.0, 2: 0.0}
    micro = clients.groupby("partition_id")["micro_batch"].max().to_dict()
    assert micro[0] < micro[1] < micro[2] == 100  # the smaller the budget, the smaller the passes

    limited = clients[clients["budget_mb"] > 0]
    assert (limited["peak_mem_mb"] < limited["budget_mb"]).all(), limited
    assert (limited["predicted_peak_mb"] <= limited["budget_mb"] * 0.9 + 1e-9).all()  # memory-margin 0.1
    # the estimator of the clients' exact step: never under the measured peak, and exact once
    # gradients exist (round 1 allocates them inside backward, AccumulateGrad reusing buffers)
    err = (clients["predicted_peak_mb"] - clients["peak_mem_mb"]) / clients["peak_mem_mb"]
    assert err.min() > -0.002, clients
    assert err[clients["round"] > 1].abs().max() < 0.002, clients
    assert (limited["max_batch"] < 100).all() and (limited["max_batch"] >= limited["micro_batch"]).all()

    # accumulation is exact: after 2 rounds the global model equals the no-budget run's
    for name, value in unlimited.items():
        if value.is_floating_point():
            rel = float((with_budgets[name] - value).norm() / value.norm().clamp_min(1e-12))
            assert rel < 1e-5, f"{name}: {rel:.2e}"


def test_budget_too_small_is_refused_before_round_1(tmp_path):
    # the pre-flight check (as in the launcher, before Ray starts) names the budget's source
    with pytest.raises(ConfigError, match=r"device-profiles' entry 'watch' = 0.5 MiB is too small"):
        _run(tmp_path, "tiny", **{"device-profiles": "watch:0.5", "num-server-rounds": 1})
    assert not (tmp_path / "tiny").exists()


def test_budget_order_node_config_then_profile_then_default():
    profiles = parse_profiles("a:100,b:0")
    assert memory_budget_mb({"memory-budget-mb": 64}, profiles, 32.0, 0) == (64.0, "node-config key 'memory-budget-mb'")
    assert memory_budget_mb({}, profiles, 32.0, 0)[0] == 100.0
    assert memory_budget_mb({}, profiles, 32.0, 3)[0] == 0.0  # partition 3 -> profile b: unlimited
    assert memory_budget_mb({}, (), 32.0, 3) == (32.0, "run-config key 'memory-budget-mb'")
    with pytest.raises(ConfigError, match=r"node-config key 'memory-budget-mb' = 'lots' is invalid"):
        memory_budget_mb({"memory-budget-mb": "lots"}, profiles, 32.0, 0)
