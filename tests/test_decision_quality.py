"""The decision-quality experiment in its smoke configuration (the real run is a benchmark)."""

from __future__ import annotations

import math

import pandas as pd

from experiments import decision_quality


def test_smoke_sweeps_and_runs_the_optimal_policy(tmp_path, capsys):
    ratio = decision_quality.main(["--quick", "--out", str(tmp_path)])
    df = pd.read_csv(tmp_path / "decision_quality.csv")
    assert list(df.policy) == ["fixed B=16", "fixed B=256", "optimal"]
    optimal = df.set_index("policy").loc["optimal"]
    assert optimal.B >= 6 and optimal.B != 64  # chosen after the calibration rounds at B=64
    finite = df[df.time_s.apply(math.isfinite)]
    assert len(finite) >= 2 and (finite.time_s > 0).all()
    assert ratio > 0
    assert f"ratio={ratio:.4f}" in capsys.readouterr().out
    # a second invocation reads every run back from flb's cache instead of training again
    before = {p: p.read_text() for p in (tmp_path / "runs").glob("*/rounds.csv")}
    assert len(before) == 5  # 2 learning rates, 2 batches, the optimal policy
    decision_quality.main(["--quick", "--out", str(tmp_path)])
    assert {p: p.read_text() for p in (tmp_path / "runs").glob("*/rounds.csv")} == before  # wall_s would differ
    assert "final val" not in capsys.readouterr().out  # the line of a run trained
