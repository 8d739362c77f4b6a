"""The generalisation-gap benchmark in its --quick configuration (the full run is a benchmark)."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments import generalization_gap as gg


def test_quick_runs_every_method_under_both_budgets(tmp_path, capsys):
    summary = gg.main(["--quick", "--quiet", "--out", str(tmp_path), "--methods", ",".join(gg.METHODS)])
    final = pd.read_csv(tmp_path / "generalization_gap_quick.csv")
    for column in ("budget", "method", "seed", "test_accuracy", "lr", "final_train_loss", "model", "steps"):
        assert column in final.columns
    assert set(final.method) == set(gg.METHODS)
    assert set(final.budget) == {"equal-epochs", "equal-iterations"}
    assert (final.error.fillna("") == "").all() and final.test_accuracy.between(0, 1).all()
    eq = summary[summary.budget == "equal-epochs"].set_index("method")
    it = summary[summary.budget == "equal-iterations"].set_index("method")
    # equal epochs: the same examples, 16x fewer sequential steps for every large-batch method
    assert (eq.samples == eq.loc["small", "samples"]).all()
    assert (eq.drop(index="small").steps * 16 == eq.loc["small", "steps"]).all()
    assert eq.loc["post-local", "rounds"] < eq.loc["post-local", "steps"]  # local steps: fewer rounds
    assert eq.loc["swap", "rounds"] < eq.loc["swap", "steps"]
    # equal iterations: the small batch takes the large batch's steps, so it sees 16x fewer examples
    assert it.loc["small", "steps"] == it.loc["large", "steps"] and it.loc["small", "samples"] * 16 == it.loc["large", "samples"]
    assert eq.loc["small", "test_mean"] > eq.loc["large", "test_mean"] + 0.1  # 64 small steps vs 4 large ones
    assert eq.loc["small", "gap_pp"] == 0.0
    assert eq.loc["large", "gap_pp"] == pytest.approx(100 * (eq.loc["small", "test_mean"] - eq.loc["large", "test_mean"]))
    learned = pd.read_csv(tmp_path / "generalization_gap_learned_quick.csv")
    assert [c for c in learned.columns if c.startswith("teacher_gain_")] and learned["round"].max() == 4
    assert (tmp_path / "generalization_gap_quick.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "goal" in out and "teacher overhead learned" in out
    # a second invocation reads every run back instead of training it
    gg.main(["--quick", "--quiet", "--out", str(tmp_path), "--methods", ",".join(gg.METHODS)])
    assert pd.read_csv(tmp_path / "generalization_gap_quick.csv").cached.all()


def test_small_reference_chooses_on_validation_and_reports_the_evaluation_seeds(tmp_path):
    setting = gg.Setting(train_limit=100, epochs=2.0, small=10)
    base = {"dataset": "cifar10", "model": "cnn", "train_limit": 100, "epochs": 2.0, "augment": False, "batch": 10,
            "steps": 20, "train_loss_last_epoch": 0.5, "wall_s": 2.0}
    rows = [dict(base, lr=0.1, seed=0, val_acc=0.5, test_acc=0.9),  # best on test, not on validation
            dict(base, lr=0.2, seed=0, val_acc=0.6, test_acc=0.4),
            dict(base, lr=0.2, seed=1, val_acc=0.6, test_acc=0.41), dict(base, lr=0.2, seed=2, val_acc=0.6, test_acc=0.42),
            dict(base, lr=0.1, seed=3, val_acc=0.6, test_acc=0.99),  # another learning rate: not an evaluation run
            dict(base, lr=0.2, seed=1, val_acc=0.6, test_acc=0.0, batch=20)]  # another batch
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(gg.json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="seeds \\[1, 2\\] at lr 0.2"):
        gg.small_reference(path, setting)
    path.write_text(path.read_text() + gg.json.dumps(dict(base, lr=0.2, seed=3, val_acc=0.6, test_acc=0.43)) + "\n")
    tuning, final = gg.small_reference(path, setting)
    assert [r["chosen"] for r in tuning] == [False, True]
    assert [r["test_accuracy"] for r in final] == [0.41, 0.42, 0.43] and {r["source"] for r in final} == {"torch"}
    assert gg.summarise(gg.pd.DataFrame(final)).loc[0, "test_mean"] == pytest.approx(0.42)
