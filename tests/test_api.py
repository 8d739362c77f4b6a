"""The Python API: runs and sweeps cached by config, tidy results, summaries, failures recorded."""

from __future__ import annotations

import pytest

import flb
from workloads.errors import ConfigError

BASE = {"num-server-rounds": 4, "eval-every": 2, "global-batch-size": 64}


def test_a_sweep_runs_once_and_is_read_back(tmp_path):
    grid = {"teacher": ["none", "adascale"]}
    first = flb.sweep(grid, seeds=[1, 2], base=BASE, clients=4, out=tmp_path, progress=False)
    assert len(first) == 4 and not any(r.cached for r in first)
    again = flb.sweep(grid, seeds=[1, 2], base=BASE, clients=4, out=tmp_path, progress=False)
    assert all(r.cached for r in again) and [r.folder for r in again] == [r.folder for r in first]
    df = again.rounds()
    assert {"teacher", "seed", "global-batch-size", "step_lr", "lr", "test_accuracy", "run"} <= set(df.columns)
    assert len(df) == 4 * 5  # rounds 0..4 of 4 runs
    table = flb.summarize(df, by="teacher").set_index("teacher")
    assert list(table["runs"]) == [2, 2] and table.loc["none", "seeds"] == [1, 2]
    finals = [r.final["test_accuracy"] for r in again if r.config["teacher"] == "none"]
    assert table.loc["none", "mean"] == pytest.approx(sum(finals) / 2)
    assert again.runs[0].clients["partition_id"].nunique() == 4


def test_bad_input_stops_before_any_training(tmp_path):
    with pytest.raises(ConfigError, match=r"'teacher' = 'oracle' is not allowed"):
        flb.sweep({"teacher": ["none", "oracle"]}, seeds=[1], base=BASE, out=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # the valid first point did not run either
    with pytest.raises(ConfigError, match="engine = 'spark'"):
        flb.run(BASE, engine="spark", out=tmp_path / "x", progress=False)


def test_a_run_that_stops_early_is_recorded_when_asked(tmp_path):
    config = BASE | {"teacher": "step", "teacher-steps": "0:1,2:1e39"}  # a step that would make the model non-finite
    with pytest.raises(RuntimeError, match="round 3: the server step would make the global model non-finite"):
        flb.run(config, clients=2, out=tmp_path / "raise", progress=False)
    run = flb.run(config, clients=2, out=tmp_path / "record", progress=False, on_error="record")
    assert run.error.startswith("DivergenceError: round 3") and int(run.final["round"]) == 2
    again = flb.run(config, clients=2, out=tmp_path / "record", progress=False, on_error="record")
    assert again.cached and again.error == run.error


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path):
    first = flb.run(BASE, clients=2, out=tmp_path, progress=False)
    for name in ("model.pt", "checkpoint.pt"):  # as a run interrupted before its first checkpoint leaves it
        (tmp_path / name).unlink()
    again = flb.run(BASE, clients=2, out=tmp_path, progress=False)
    assert not again.cached and again.rounds["train_loss"].iloc[1:].tolist() == first.rounds["train_loss"].iloc[1:].tolist()
    for name in ("model.pt", "checkpoint.pt"):
        (tmp_path / name).unlink()
    with pytest.raises(ConfigError, match="holds a different run"):  # another config's run is not replaced
        flb.run(BASE | {"lr": 0.05}, clients=2, out=tmp_path, progress=False)


def test_the_ray_engine_gives_the_same_run(tmp_path, one_thread):
    config = BASE | {"num-server-rounds": 2}
    ray = flb.run(config, clients=2, engine="ray", out=tmp_path / "ray", progress=False)
    local = flb.run(config, clients=2, out=tmp_path / "local", progress=False)
    assert ray.rounds["train_loss"].iloc[1:].tolist() == local.rounds["train_loss"].iloc[1:].tolist()
    assert "Aggregated MetricRecord" not in (ray.folder / "run.log").read_text()  # Flower's per-round chatter is gone
