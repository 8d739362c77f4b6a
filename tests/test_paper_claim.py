"""The paper-claim experiment in its tiny smoke configuration (the real run is a benchmark)."""

from __future__ import annotations

import pandas as pd

from experiments import paper_claim


def test_smoke_runs_every_method_under_both_budgets(tmp_path, capsys):
    summary = paper_claim.main(["--smoke", "--dataset", "digits", "--model", "mlp", "--quiet", "--out", str(tmp_path)])
    final = pd.read_csv(tmp_path / "paper_claim.csv")
    assert set(final.method) == set(paper_claim.METHODS)
    assert set(final.budget) == {"equal-epochs", "equal-iterations"}
    eq_epochs = summary[summary.budget == "equal-epochs"].set_index("method")
    eq_iters = summary[summary.budget == "equal-iterations"].set_index("method")
    # equal epochs: same examples; equal iterations: same steps, so the small batch sees 16x fewer
    assert eq_epochs.loc["small", "samples"] == eq_epochs.loc["large", "samples"] == 1024
    assert eq_iters.loc["small", "rounds"] == eq_iters.loc["large", "rounds"]
    assert eq_iters.loc["small", "samples"] * 16 == eq_iters.loc["large", "samples"]
    assert final.test_accuracy.between(0, 1).all()
    assert (tmp_path / "paper_claim.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "goal" in out and "teacher overhead noise" in out
    # a second invocation recalls every run from the log instead of training again
    before = (tmp_path / "paper_claim_runs.jsonl").read_text()
    paper_claim.main(["--smoke", "--dataset", "digits", "--model", "mlp", "--quiet", "--out", str(tmp_path)])
    assert (tmp_path / "paper_claim_runs.jsonl").read_text() == before
