"""The parallel performance model: fitting, inversion, round time and batch splitting."""

from __future__ import annotations

import numpy as np
import pytest

from estimators.performance import (
    IterTimeModel,
    choose_batch,
    comm_seconds,
    fit_iter_time,
    fit_linear,
    pollux_efficiency,
    round_seconds,
    split_for_equal_finish,
    steps_factor,
)
from workloads.devices import DeviceProfile


@pytest.mark.parametrize(
    "truth",
    [IterTimeModel(0.002, 0.05, 0.0004, 4.0), IterTimeModel(0.01, 0.003, 0.001, 1.5), IterTimeModel(0.0, 0.2, 0.0001, 8.0)],
)
def test_fit_recovers_a_knee_from_four_points(truth):
    profiled = np.array([1, 16, 128, 512])
    model = fit_iter_time(profiled, truth(profiled))
    grid = np.arange(1, 513)
    err = np.abs(model(grid) / truth(grid) - 1)
    assert err.max() < 0.05, f"max relative error {err.max():.3f}"


def test_linear_model_misses_the_knee_that_the_fit_captures():
    truth = IterTimeModel(0.001, 0.08, 0.0002, 6.0)  # flat until b ~ 400, then linear
    profiled = np.array([1, 32, 256, 1024])
    grid = np.arange(1, 1025)
    ours = np.abs(fit_iter_time(profiled, truth(profiled))(grid) / truth(grid) - 1).mean()
    linear = np.abs(fit_linear(profiled, truth(profiled))(grid) / truth(grid) - 1).mean()
    assert ours < 0.02 < 0.1 < linear  # the linear model is off by >10% on average


def test_inverse_and_speed_scaling():
    m = IterTimeModel(0.01, 0.05, 0.001, 3.0)
    for b in (1.0, 10.0, 300.0):
        assert m.inverse(m(b)) == pytest.approx(b, rel=1e-6)
    assert m.inverse(0.05) == 0.0  # below alpha + floor nothing fits
    assert m.scaled(4.0)(100) == pytest.approx(m(100) / 4)


def test_communication_and_round_time():
    link = DeviceProfile("x", 0, 1.0, bandwidth_mbps=80.0, latency_ms=10.0)
    # 10 MB down and 10 MB up at 80 Mbit/s is 2 s, plus 2 x 10 ms latency
    assert comm_seconds(10e6, link) == pytest.approx(2.02)
    assert round_seconds([1.0, 3.0, 2.0], [0.5, 0.1, 2.0], server_s=0.25) == pytest.approx(4.25)


def test_statistical_efficiency():
    assert steps_factor(1000, 1000) == pytest.approx(2.0)
    assert pollux_efficiency(64, 64, 500) == 1.0
    assert pollux_efficiency(1024, 64, 500) == pytest.approx(564 / 1524)


def test_split_makes_clients_finish_together_within_memory():
    fast, slow = IterTimeModel(0.0, 0.01, 0.001, 2.0), IterTimeModel(0.0, 0.04, 0.004, 2.0)
    models, comm = [fast, fast, slow], [0.1, 0.1, 0.1]
    split = split_for_equal_finish(600, models, comm, max_batches=[1000, 1000, 1000])
    assert sum(split) == 600 and split[0] == split[1] > 3 * split[2]
    finish = [m(b) + c for m, b, c in zip(models, split, comm)]
    assert max(finish) / min(finish) < 1.05
    capped = split_for_equal_finish(600, models, comm, max_batches=[200, 1000, 1000])
    assert sum(capped) == 600 and capped[0] == 200 and capped[1] > split[1]
    with pytest.raises(ValueError, match="total memory limit"):
        split_for_equal_finish(5000, models, comm, max_batches=[1000, 1000, 1000])


def test_choose_batch_trades_round_time_against_steps():
    models = [IterTimeModel(0.005, 0.02, 0.0005, 3.0)] * 4
    comm = [0.05] * 4
    # Little noise: large batches buy nothing, the smallest round wins.
    quiet = choose_batch(models, comm, [4096] * 4, noise_scale=1.0)
    # Much noise: steps shrink with B until rounds get long; an interior optimum.
    noisy = choose_batch(models, comm, [4096] * 4, noise_scale=4000.0)
    assert quiet.global_batch < 64 < noisy.global_batch < 16384
    b = np.array([row[0] for row in noisy.table])
    times = np.array([row[2] for row in noisy.table])
    assert noisy.rel_time == times.min() and sum(noisy.split) == noisy.global_batch
    # A brute-force check of the score on its own grid
    i = int(np.argmin(times))
    assert b[i] == noisy.global_batch
    cheap = choose_batch(models, comm, [4096] * 4, noise_scale=4000.0, objective="cost")
    assert cheap.global_batch <= noisy.global_batch  # compute cost favours less parallel waste
