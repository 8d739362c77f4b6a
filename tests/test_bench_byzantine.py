"""The Byzantine benchmark's loop (experiments/bench_byzantine.py) on digits, a few rounds."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
import torch

from experiments.bench_byzantine import QUICK_RUNS, Bench, run_one
from experiments.byzantine_args import Scale
from experiments.byzantine_report import gap_table, paired_gaps, quick_line, summary


@pytest.fixture(scope="module")
def bench() -> Bench:
    torch.set_num_threads(1)
    return Bench.create("digits", "", seed=1)


def test_clean_mean_learns_and_centered_clip_survives_ipm_with_8_of_20(bench):
    scale = Scale(rounds=15, global_batch=320, lr=0.3)
    clean = run_one(bench, "mean", "clean", scale)
    assert clean["status"] == "ok" and clean["rounds"] == 15 and clean["f"] == 0
    assert clean["test_accuracy"] > 0.6  # chance is 0.1
    assert clean["rejected_byzantine"] == clean["rejected_honest"] == 0
    assert (clean["global_batch"], clean["lr"]) == (320, 0.3)
    cc = run_one(bench, "centered-clip", "ipm", scale)
    assert cc["status"] == "ok" and cc["f"] == 8
    assert cc["test_accuracy"] > 0.4
    # IPM's small vectors are well-formed: the server accepts them all (nothing but the aggregator stops them)
    assert cc["rejected_byzantine"] == 0
    # Krum picks one of the 8 identical -0.1 * mean vectors: gradient ascent, below chance (Karimireddy et al. 2021)
    assert run_one(bench, "krum", "ipm", scale)["test_accuracy"] < 0.2


def test_bit_flips_break_the_mean_and_the_failed_run_is_recorded(bench):
    """Four huge bit-flipped gradients in round 1: the norm guard rejects at most one, the model blows up."""
    row = run_one(bench, "mean", "bit-flip", Scale(rounds=5, global_batch=320, lr=0.3))
    assert row["status"].startswith("failed in round") and row["rounds"] < 5
    assert 0.0 <= row["test_accuracy"] <= 1.0
    median = run_one(bench, "median", "bit-flip", Scale(rounds=5, global_batch=320, lr=0.3))
    assert median["status"] == "ok" and median["rounds"] == 5


def test_the_oracle_removes_the_byzantine_partitions_and_the_run_goes_on(bench):
    """``absent-8``: partitions 0..7 never reply; each round is the 12 honest clients' step (min-batch-fraction 0.5)."""
    row = run_one(bench, "mean", "absent-8", Scale(rounds=15, global_batch=320, lr=0.3))
    assert row["status"] == "ok" and row["rounds"] == 15 and row["f"] == 8
    assert row["rejected_byzantine"] == 8 * 15 and row["rejected_honest"] == 0  # missing replies are recorded
    assert row["test_accuracy"] > 0.6


def test_the_quick_line_and_the_table():
    rows = [{"dataset": "mnist", "aggregator": a, "attack": t, "seed": s, "test_accuracy": 0.5 + 0.1 * i + 0.01 * s,
             "status": "ok"} for i, (a, t) in enumerate(QUICK_RUNS) for s in (1, 2)]
    df = pd.DataFrame(rows)
    line = quick_line(df)
    assert re.fullmatch(r"clean=0\.\d{4} mean_alie=0\.\d{4} cc_alie=0\.\d{4} mean_ipm=0\.\d{4} cc_ipm=0\.\d{4}", line)
    assert line.startswith("clean=0.5150 mean_alie=0.6150 cc_alie=0.7150")
    table = summary(df.assign(status=["ok"] * 9 + ["failed in round 3: RoundFailure"]), "mnist")
    assert "| mean | 51.5 ± 0.7 | 61.5 ± 0.7 | 81.5 ± 0.7 |" in table
    assert "| centered-clip |  | 71.5 ± 0.7 | 91.5 ± 0.7 *1 |" in table


def test_paired_gaps_pair_by_seed_and_give_the_t_interval():
    """Gaps -1, -2, -1 points: mean -4/3, sd 0.577, t(0.975, 2) = 4.303, half-width 1.434; failed runs are left out."""
    rows = [("mean", "clean", s, acc, "ok") for s, acc in ((1, 0.90), (2, 0.92), (3, 0.94))]
    rows += [("centered-clip", "alie", s, acc, "ok") for s, acc in ((1, 0.89), (2, 0.90), (3, 0.93))]
    rows += [("centered-clip", "alie", 4, 0.10, "failed in round 3: RoundFailure"),  # no clean seed 4 either
             ("centered-clip", "ipm", 2, 0.925, "ok")]
    df = pd.DataFrame(rows, columns=["aggregator", "attack", "seed", "test_accuracy", "status"]).assign(
        dataset="mnist", val_accuracy=lambda d: d.test_accuracy)
    gaps = paired_gaps(df, "mnist").set_index("attack")
    assert list(gaps.index) == ["alie", "ipm"]
    assert gaps.loc["alie", "seeds"] == 3 and gaps.loc["alie", "worst_seed"] == pytest.approx(-2.0)
    assert gaps.loc["alie", "gap"] == pytest.approx(-4 / 3)
    assert (gaps.loc["alie", "low"], gaps.loc["alie", "high"]) == pytest.approx((-2.7676, 0.1009), abs=1e-4)
    assert gaps.loc["ipm", "gap"] == pytest.approx(0.5) and math.isnan(gaps.loc["ipm", "low"])  # one seed: no interval
    table = gap_table(gaps.reset_index())
    assert "| alie | 3 | -1.33 | [-2.77, +0.10] | -2.00 | no (interval crosses) |" in table
    assert "| -2.00 | yes (interval crosses) |" in gap_table(gaps.reset_index(), goal_pp=2.0)
    assert "| ipm | 1 | +0.50 | none | +0.50 | yes (one seed) |" in table
    assert "| -2.00 | yes |" in gap_table(gaps.reset_index(), goal_pp=3.0)
    with pytest.raises(ValueError, match="split = 'train'"):
        paired_gaps(df, "mnist", split="train")


def test_floor_gaps_compare_each_attack_with_the_run_without_its_f_clients():
    """ALIE (f = 4) against absent-4, IPM (f = 8) against absent-8, seed by seed; clean and absent-f are not rows."""
    rows = [("mean", "clean", s, 0.95) for s in (1, 2)]
    rows += [("mean", "absent-4", 1, 0.94), ("mean", "absent-4", 2, 0.93),
             ("mean", "absent-8", 1, 0.90), ("mean", "absent-8", 2, 0.91)]
    rows += [("centered-clip", "alie", 1, 0.93), ("centered-clip", "alie", 2, 0.93),
             ("centered-clip", "ipm", 1, 0.91), ("centered-clip", "ipm", 2, 0.89),
             ("centered-clip", "absent-8", 1, 0.99)]
    df = pd.DataFrame(rows, columns=["aggregator", "attack", "seed", "test_accuracy"]).assign(
        dataset="digits", status="ok", val_accuracy=lambda d: d.test_accuracy)
    gaps = paired_gaps(df, "digits", floor=True).set_index("attack")
    assert list(gaps.index) == ["alie", "ipm"]
    assert gaps.loc["alie", "gap"] == pytest.approx(-0.5) and gaps.loc["alie", "worst_seed"] == pytest.approx(-1.0)
    assert gaps.loc["ipm", "gap"] == pytest.approx(-0.5) and gaps.loc["ipm", "worst_seed"] == pytest.approx(-2.0)
    assert paired_gaps(df, "digits").set_index("attack").loc["ipm", "gap"] == pytest.approx(-5.0)


def test_grid_filters_name_the_bad_value():
    from experiments.byzantine_args import grid_runs

    assert grid_runs("mean,centered-clip", "clean,ipm") == [
        ("mean", "clean"), ("centered-clip", "clean"), ("mean", "ipm"), ("centered-clip", "ipm")]
    with pytest.raises(ValueError, match=r"--aggregators = mean,foo: 'foo' is not one of mean, centered-clip"):
        grid_runs("mean,foo", "clean")
    with pytest.raises(ValueError, match=r"--attacks"):
        grid_runs("mean", "")
    assert grid_runs("mean", "absent-4") == [("mean", "absent-4")]  # the oracle: only when asked for
    assert grid_runs("centered-clip", "alie-paper") == [("centered-clip", "alie-paper")]  # the paper's attacks too


def test_unknown_dataset_is_named_before_any_run():
    from experiments import bench_byzantine

    with pytest.raises(SystemExit, match=r"--datasets = 'digits,cifar': 'cifar' is not one of digits, mnist, cifar10"):
        bench_byzantine.main(["--datasets", "digits,cifar"])
    with pytest.raises(SystemExit, match=r"--global-batch = 650: must be 0 \(the dataset's\) or a positive multiple of 20"):
        bench_byzantine.main(["--datasets", "digits", "--global-batch", "650"])
    with pytest.raises(SystemExit, match=r"--seeds = 3, --first-seed = 0: both must be >= 1"):
        bench_byzantine.main(["--datasets", "digits", "--first-seed", "0"])


def test_first_seed_extends_a_grid_with_the_same_runs(tmp_path):
    """Seeds 2..3 of a grid started at seed 2 are the runs seeds 2..3 of a grid started at 1."""
    from experiments import bench_byzantine

    common = ["--datasets", "digits", "--rounds", "3", "--aggregators", "mean", "--attacks", "clean"]
    bench_byzantine.main(common + ["--seeds", "3", "--out", str(tmp_path / "a")])
    bench_byzantine.main(common + ["--seeds", "2", "--first-seed", "2", "--out", str(tmp_path / "b")])
    a, b = (pd.read_csv(tmp_path / d / "bench_byzantine.csv") for d in ("a", "b"))
    assert list(a.seed) == [1, 2, 3] and list(b.seed) == [2, 3]
    assert list(b.test_accuracy) == list(a.test_accuracy[1:])
    assert (tmp_path / "a" / "bench_byzantine.png").is_file()  # without --plot, beside its CSV


def test_cc_radius_sweep_picks_the_scale_with_the_best_worst_attack(tmp_path, capsys):
    from experiments import cc_radius

    cc_radius.main(["--datasets", "digits", "--seeds", "1", "--scales", "0.5,2", "--bucket-sizes", "1,2",
                    "--rounds", "1", "--out", str(tmp_path), "--csv", "sweep.csv"])
    df = pd.read_csv(tmp_path / "sweep.csv")
    assert len(df) == 6 * 5 and set(df.radius_scale) == {0.0, 0.5, 2.0} and set(df.bucket_size) == {1, 2}
    assert "chosen on validation: cc-radius-scale" in capsys.readouterr().out
    # the worst drop is computed against the clean mean run: fix the numbers and check them
    df["val_accuracy"] = 0.9
    df.loc[(df.radius_scale == 0) & (df.attack == "clean"), "val_accuracy"] = 0.95
    df.loc[df.bucket_size == 2, "val_accuracy"] = 0.93
    df.loc[(df.radius_scale == 2.0) & (df.attack == "ipm"), "val_accuracy"] = 0.80
    _, worst = cc_radius.table(df, "digits", "val")
    assert worst[(0.5, 1, 10.0)] == pytest.approx(-5.0) and worst[(2.0, 1, 10.0)] == pytest.approx(-15.0)
    assert worst[(0.5, 2, 10.0)] == pytest.approx(-2.0) and worst[(2.0, 2, 10.0)] == pytest.approx(-15.0)
    with pytest.raises(SystemExit, match=r"--bucket-sizes = '1,x'"):
        cc_radius.main(["--bucket-sizes", "1,x"])
    with pytest.raises(SystemExit, match=r"--drop-ratios = '0,1': need one or more values, each 0 \(off\) or > 1"):
        cc_radius.main(["--drop-ratios", "0,1"])
    with pytest.raises(SystemExit, match=r"--weight-decay = 1.5: must be in \[0, 1\)"):
        cc_radius.main(["--weight-decay", "1.5"])


def test_cc_distances_ratios_by_hand_and_the_report(capsys):
    from experiments import cc_distances

    rows = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    assert cc_distances.ratios(rows, torch.zeros(2)).tolist() == [0.0, 1.0, 2.0]  # distances 0, 5, 10; median 5
    assert cc_distances.ratios(rows, torch.tensor([3.0, 4.0])).tolist() == [1.0, 0.0, 1.0]
    cc_distances.main(["--attacks", "sign-flip", "--rounds", "2"])
    out = capsys.readouterr().out
    assert "sign-flip (f = 4), default centered-clip" in out
    assert out.count("round   2: attackers [") == 2  # both views, four attackers each
    assert out.count("of 2 rounds") == 2
    with pytest.raises(SystemExit, match=r"--attacks: 'clean' is not an attack"):
        cc_distances.main(["--attacks", "clean"])
    with pytest.raises(SystemExit, match=r"--ema = 1.0: must be in \[0, 1\)"):
        cc_distances.main(["--ema", "1"])
    with pytest.raises(SystemExit, match=r"--global-batch = 30: must be 0 \(the dataset's\) or a positive multiple of 20"):
        cc_distances.main(["--global-batch", "30"])


def test_byz_trace_points_match_the_run_and_bad_runs_are_named(bench, capsys):
    from experiments import byz_trace

    assert byz_trace.model_norm({"w": torch.tensor([3.0, 4.0]), "steps": torch.tensor([7])}) == 5.0  # ints skipped
    trace = byz_trace.Trace(bench, every=2, last=5)
    row = run_one(bench, "centered-clip", "alie", Scale(rounds=5, global_batch=320, lr=0.3), on_round=trace)
    assert [r for r, _, _ in trace.points] == [2, 4, 5]
    assert trace.points[-1][1] == pytest.approx(row["val_accuracy"], abs=1e-9)  # the same model, the whole val split
    assert trace.points[0][2] > 0 and all(0 <= v <= 1 for _, v, _ in trace.points)
    byz_trace.main(["--runs", "mean:clean", "--rounds", "3", "--every", "2"])
    out = capsys.readouterr().out
    assert re.search(r"mean clean: test 0\.\d{4} ok \| 2:\d+\.\d/\d+\.\d 3:\d+\.\d/\d+\.\d$", out.strip())
    with pytest.raises(SystemExit, match=r"--runs: 'mean:alie:x' is not aggregator:condition"):
        byz_trace.main(["--runs", "mean:alie:x"])
    with pytest.raises(SystemExit, match=r"--runs: 'median:nope' is not aggregator:condition"):
        byz_trace.main(["--runs", "median:nope"])
    with pytest.raises(SystemExit, match=r"--every = 0, --rounds = 400: both must be >= 1"):
        byz_trace.main(["--every", "0"])


def test_weight_decay_override_reaches_the_run_config_and_bad_values_are_named():
    from experiments.bench_byzantine import run_config
    from experiments.byzantine_args import SCALES, overridden

    base = SCALES["digits"]
    assert overridden(base).weight_decay is None
    s = overridden(base, rounds=400, weight_decay=0.01)
    assert (s.rounds, s.global_batch, s.lr, s.weight_decay) == (400, 320, 0.3, 0.01)
    assert run_config("digits", "centered-clip", "alie", s, 1).weight_decay == 0.01
    assert run_config("digits", "centered-clip", "alie", base, 1).weight_decay == 5e-4  # the run-config default
    assert overridden(s, lr=0.2).weight_decay == 0.01  # kept when not given
    with pytest.raises(SystemExit, match=r"--weight-decay = -0.1: must be in \[0, 1\)"):
        overridden(base, weight_decay=-0.1)


def test_drop_ratio_override_reaches_the_run_config_and_bad_values_are_named(bench):
    from experiments.bench_byzantine import run_config
    from experiments.byzantine_args import SCALES, overridden

    base = SCALES["mnist"]
    s = overridden(base, rounds=400, weight_decay=0.005, cc_drop_ratio=4)
    assert (s.rounds, s.weight_decay, s.cc_drop_ratio) == (400, 0.005, 4)
    assert run_config("mnist", "centered-clip", "alie", s, 1).cc_drop_ratio == 4
    assert run_config("mnist", "centered-clip", "alie", s, 1, drop_ratio=0.0).cc_drop_ratio == 0  # cc_radius's sweep
    assert run_config("mnist", "centered-clip", "alie", base, 1).cc_drop_ratio == 10  # the run-config default
    assert overridden(s, lr=0.2).cc_drop_ratio == 4  # kept when not given
    assert overridden(base, cc_drop_ratio=0).cc_drop_ratio == 0  # 0 turns dropping off
    assert run_one(bench, "centered-clip", "clean", Scale(2, 320, 0.3, cc_drop_ratio=4))["cc_drop_ratio"] == 4
    for bad in (1.0, 0.5, -2.0):
        with pytest.raises(SystemExit, match=rf"--cc-drop-ratio = {bad}: must be 0 \(off\) or > 1"):
            overridden(base, cc_drop_ratio=bad)


def test_momentum_override_reaches_the_run_config_and_the_row_and_bad_values_are_named(bench):
    from experiments.bench_byzantine import run_config
    from experiments.byzantine_args import SCALES, overridden

    base = SCALES["digits"]
    s = overridden(base, lr=0.03, momentum=0.99)
    assert (s.lr, s.momentum) == (0.03, 0.99)
    assert run_config("digits", "centered-clip", "alie", s, 1).momentum == 0.99
    assert run_config("digits", "centered-clip", "alie", base, 1).momentum == 0.9  # the run-config default
    assert overridden(s, rounds=5).momentum == 0.99  # kept when not given
    a = run_one(bench, "centered-clip", "clean", Scale(3, 320, 0.3, momentum=0.0))
    b = run_one(bench, "centered-clip", "clean", Scale(3, 320, 0.3))
    assert (a["momentum"], b["momentum"]) == (0.0, 0.9)
    assert a["val_accuracy"] != b["val_accuracy"]  # the momentum changed the steps
    for bad in (1.0, -0.1):
        with pytest.raises(SystemExit, match=rf"--momentum = {bad}: must be in \[0, 1\)"):
            overridden(base, momentum=bad)


def test_single_seed_scripts_take_the_momentum():
    import argparse

    from experiments.bench_byzantine import add_run_args, run_setting

    p = argparse.ArgumentParser()
    add_run_args(p, rounds=10)
    scale, _ = run_setting(p.parse_args(["--momentum", "0.99", "--lr", "0.03"]))
    assert (scale.rounds, scale.lr, scale.momentum) == (10, 0.03, 0.99)
    assert run_setting(p.parse_args([]))[0].momentum is None  # the run-config default
    with pytest.raises(SystemExit, match=r"--momentum = 1.5: must be in \[0, 1\)"):
        run_setting(p.parse_args(["--momentum", "1.5"]))
