"""Batch schedules as batch policies: ``step`` (Smith et al. 2018) and ``noise`` (McCandlish et al. 2018)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from flb.inprocess import run_inprocess
from tests.resume import crash_then_resume, max_model_difference
from server_app.preflight import parse_run_config, preflight
from estimators.performance import KneeModel
from strategies.batch_policy import (
    BatchPolicy,
    ClientCapacity,
    PolicyMemory,
    largest_scheduled_batch,
    noise_batches,
    noise_moments,
    noise_scale_of,
    noise_time_cap,
    scheduled_batch,
    split_batch,
)
from strategies.teachers import parse_steps
from strategies.noise_scale import NoiseStats
from workloads.config import ConfigError, RunConfig

BASE = {"num-server-rounds": 6, "eval-every": 100, "global-batch-size": 32, "warmup-rounds": 0,
        "schedule": "constant"}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_step_schedule_multiplies_the_global_batch_per_round():
    steps = parse_steps("0:1,2:2,0.75:4", 8, "batch-steps")  # 0.75 of 8 rounds: after 6 completed rounds
    assert steps == [(0, 1.0), (2, 2.0), (6, 4.0)]
    assert [scheduled_batch(32, steps, r) for r in range(1, 9)] == [32, 32, 64, 64, 64, 64, 128, 128]
    assert largest_scheduled_batch(32, steps, 8) == 128
    assert largest_scheduled_batch(32, steps, 6) == 64  # the x4 step would start after the last round
    assert [scheduled_batch(10, [(0, 1.5)], 1)] == [15]


def _linear_clients(k: int, seconds_per_example: float, limit: int) -> list[ClientCapacity]:
    """k clients whose step takes seconds_per_example x b_i (a knee with a negligible floor), no link."""
    model = KneeModel(alpha=0.0, floor=1e-9, beta=seconds_per_example, p=1.0, q=1.0)
    return [ClientCapacity(10 + i, i, limit, model, 0.0, 0.0) for i in range(k)]


def test_noise_time_cap_is_where_more_batch_stops_buying_time():
    # two clients at 0.01 s per example: round_s = 0.005 B + L, so (1 + E/B) round_s is least at B* = sqrt(L E / 0.005)
    clients = _linear_clients(2, 0.01, 1000)
    for latency, noise, best in ((2.0, 100.0, 200.0), (0.5, 400.0, 200.0), (8.0, 50.0, 283.0)):
        cap = noise_time_cap(clients, noise, latency)
        assert abs(math.log(cap / best)) < math.log(1.16), (latency, noise, cap)  # the candidate grid's step
    assert noise_time_cap(clients, 100.0, 0.0) == 2  # no fixed cost a round: the smallest batch is quickest
    assert noise_time_cap(clients, 100.0, 1e6) == 2000  # latency-bound rounds: all the memory allows


def test_noise_policy_caps_the_batch_at_the_time_optimum_unless_told_not_to():
    memory = PolicyMemory(capacities=tuple(_linear_clients(2, 0.01, 1000)), noise_ema=5000.0, noise_batch=16)
    for flag, expected in ((True, noise_time_cap(list(memory.capacities), 5000.0, 2.0)), (False, 2000)):
        cfg = RunConfig.from_mapping({"batch-policy": "noise", "global-batch-size": 16, "round-latency-s": 2.0,
                                      "batch-time-cap": flag})
        planned = BatchPolicy(cfg, (), 1.0)._plan_noise(memory, 5, 2)
        assert planned.noise_batch == expected and sum(planned.current.values()) == expected
    assert 16 < noise_time_cap(list(memory.capacities), 5000.0, 2.0) < 2000  # sqrt(2 x 5000 / 0.005) = 1414


def test_even_split_over_partitions_respects_limits():
    assert split_batch(10, [3, 1, 2], 3) == {1: 4, 2: 3, 3: 3}  # as split_global_batch, in partition order
    assert split_batch(100, [0, 1, 2, 3], 4, {0: 10, 1: 100, 2: 100, 3: 100}) == {0: 10, 1: 30, 2: 30, 3: 30}
    assert split_batch(101, [0, 1, 2], 2) == {0: 50, 1: 50, 2: 50}  # K < partitions: round(B / K) each


def test_noise_policy_sequence_is_the_clamped_monotone_ratio_of_averages():
    # decay 0.5, B = 64, memory cap 500; round r uses the averages of rounds < r; stats = (tr_sigma, grad_sq)
    seq = [(100.0, 1.0), (math.nan, math.nan), (300.0, 0.5), (2000.0, 1.0), (50.0, 1.0), (10.0, 1.0)]
    # averages: (100, 1) -> E 100; nan skipped; (200, 0.75) -> 266.7; (1100, 0.875) -> 1257; (575, .9375) -> 613
    assert noise_batches(seq, 64, 500, 0.5) == [64, 100, 100, 267, 500, 500]  # capped; never shrinks after
    # the ratio of averages: a round with |mu|^2 near zero is no spike (the mean of ratios would be 5,000,050)
    assert noise_batches([(100.0, 1.0), (100.0, 1e-5), (100.0, 1.0)], 64, 10**6, 0.5) == [64, 100, 200]
    # an unbiased negative |mu|^2 counts; E waits until the averaged |mu|^2 is positive
    assert noise_batches([(100.0, -1.0), (100.0, 2.0), (100.0, 1.0)], 64, 500, 0.5) == [64, 64, 200]
    assert noise_scale_of(noise_moments((100.0, -1.0), 100.0, 2.0, 0.5)) == pytest.approx(200.0)
    assert noise_batches([(100.0, 1.0)] * 3, 64, 500, 0.5, skip=2) == [64, 64, 64]  # warm-up rounds unused
    assert noise_batches([(10.0, 1.0), (20.0, 1.0)], 64, 500, 0.9) == [64, 64]  # below global-batch-size: held at it
    assert noise_batches([(900.0, 1.0)] * 2, 64, 32, 0.9) == [64, 64]  # a cap below global-batch-size: B stays B
    assert noise_moments(None, math.nan, 1.0, 0.9) is None and noise_scale_of(None) is None


def test_policy_memory_round_trips_and_reads_old_checkpoints():
    memory = PolicyMemory(current={0: 5}, noise_ema=123.5, noise_batch=77, noise_moments=(247.0, 2.0))
    assert PolicyMemory.from_dict(memory.to_dict()) == memory
    old = {k: v for k, v in memory.to_dict().items() if k not in ("noise_ema", "noise_batch", "noise_moments")}
    assert PolicyMemory.from_dict(old) == PolicyMemory(current={0: 5})
    cfg = RunConfig.from_mapping({"batch-policy": "noise", "batch-ema": 0.5, "warmup-rounds": 2})
    seen = memory.observe(cfg, 3, NoiseStats(153.0, 0.0, math.inf), 0.0)  # averages (200, 1)
    assert seen.noise_moments == pytest.approx((200.0, 1.0)) and seen.noise_ema == pytest.approx(200.0)
    assert memory.observe(cfg, 2, NoiseStats(153.0, 0.0, math.inf), 0.0) == memory  # a warm-up round: not used


def test_refusals_name_the_key_the_value_and_what_is_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"run-config key 'batch-steps' = '0:1,x'.*start:multiplier"):
        parse_run_config({"batch-steps": "0:1,x"})
    with pytest.raises(ConfigError, match=r"run-config key 'batch-policy' = 'grow' is not allowed.*step, noise"):
        parse_run_config({"batch-policy": "grow"})
    cfg = parse_run_config(BASE | {"batch-policy": "step", "batch-steps": "0:1,3:100", "out-dir": str(tmp_path / "a")})
    with pytest.raises(ConfigError, match=r"'batch-steps' = '0:1,3:100': its largest global batch, 3200 "
                                          r"\(global-batch-size 32 x multiplier\), gives a client 800 examples, more "
                                          r"than the smallest client partition \((\d+) examples\)\. Allowed: "
                                          r"multipliers <= "):
        preflight(cfg, num_nodes=4)
    cfg = parse_run_config(BASE | {"batch-policy": "step", "batch-steps": "0:0.05", "out-dir": str(tmp_path / "b")})
    with pytest.raises(ConfigError, match=r"scheduled global batch of 2 .* smaller than the round's 4 clients"):
        preflight(cfg, num_nodes=4)
    cfg = parse_run_config(BASE | {"batch-policy": "step", "batch-steps": "0:1,6:100", "out-dir": str(tmp_path / "c")})
    assert preflight(cfg, num_nodes=4) == []  # a step after the last round never applies


def test_step_policy_in_a_run_follows_the_schedule_and_the_sqrt_teacher_sees_it(tmp_path):
    config = BASE | {"batch-policy": "step", "batch-steps": "0:1,2:2,0.67:4", "teacher": "sqrt",
                     "teacher-small-batch": 32, "lr": 0.1, "out-dir": str(tmp_path)}
    rounds = pd.read_csv(run_inprocess(config, num_clients=4) / "rounds.csv").set_index("round").loc[1:]
    assert rounds["global_batch"].tolist() == [32, 32, 64, 64, 128, 128]
    clients = pd.read_csv(tmp_path / "clients.csv")
    assert (clients["local_batch"] * 4 == clients["round"].map(rounds["global_batch"])).all()  # even split
    scale = (rounds["global_batch"] / 32) ** 0.5
    assert rounds["teacher_scale"].tolist() == pytest.approx(scale.tolist(), rel=1e-5)
    assert rounds["lr"].tolist() == pytest.approx((0.1 * scale).tolist(), rel=1e-5)


def test_noise_policy_resumes_to_the_uninterrupted_model_bit_for_bit(tmp_path):
    config = BASE | {"batch-policy": "noise", "batch-ema": 0.5, "global-batch-size": 16, "teacher": "adascale",
                     "checkpoint-every": 2, "max-failed-rounds": 0, "batch-time-cap": False}
    folder_a, folder_b = crash_then_resume(config, tmp_path, crash_round=5, checkpoint_round=4)
    assert max_model_difference(folder_a, folder_b) == 0.0
    a = pd.read_csv(folder_a / "rounds.csv").loc[1:]
    b = pd.read_csv(folder_b / "rounds.csv").loc[1:]
    assert b["global_batch"].tolist() == a["global_batch"].tolist()
    # the batches follow the EMA of the measured B_simple (rounds.csv keeps 6 digits: allow one example)
    plan = json.loads((tmp_path / "a" / "batch_plan.json").read_text())
    cap = sum(c["max_batch"] for c in plan["clients"])  # memory unlimited: each client's partition
    stats = list(zip(a["tr_sigma"].tolist(), a["grad_sq"].tolist()))
    expected = noise_batches(stats, 16, cap, 0.5, skip=BASE["warmup-rounds"])
    assert a["global_batch"].iloc[0] == 16
    assert all(abs(x - y) <= 1 for x, y in zip(a["global_batch"], expected))
    assert a["global_batch"].is_monotonic_increasing and a["global_batch"].iloc[-1] > 16  # it grew
