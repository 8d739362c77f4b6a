"""The generalization-gap benchmark's report (experiments/generalization_gap.py): the summary per
budget and method, its markdown tables, the goal check and the plot."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from workloads.files import atomic_save_figure

DONE_GAP_PP = 1.5  # "done": plain large batch at least this far behind small batch at equal epochs
GOAL_PP = 0.5  # goal: a teacher within this of small batch at equal epochs


def summarise(final: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy mean +- std per budget and method, with the gap to small batch in points."""
    g = final.groupby(["budget", "method"], sort=False)
    s = g.agg(global_batch=("global_batch", "first"), steps=("steps", "first"), rounds=("rounds", "first"),
              samples=("samples", "first"), lr=("lr", "first"), test_mean=("test_accuracy", "mean"),
              test_std=("test_accuracy", "std"), train_loss=("final_train_loss", "mean"),
              failed=("error", lambda e: int((e.fillna("") != "").sum())), seeds=("seed", "count")).reset_index()
    small = s[s.method == "small"].set_index("budget")["test_mean"]
    s["gap_pp"] = [100 * (small.get(b, math.nan) - m) for b, m in zip(s.budget, s.test_mean)]
    return s


def markdown(summary: pd.DataFrame, seeds: int = 3) -> str:
    """The summary as markdown tables, one per budget (what docs/teachers.md shows)."""
    lines = []
    for budget, s in summary.groupby("budget", sort=False):
        lines += [f"**{budget}**", "", "| method | B | steps (rounds) | lr (tuned) | test % (mean +- std) | gap to small (pp) "
                  "| final train loss |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in s.itertuples():
            runs = f" ({r.seeds - r.failed} of {seeds} seeds)" if r.failed or r.seeds < seeds else ""
            std = f" +- {100 * r.test_std:.2f}" if r.test_std == r.test_std else ""
            lines.append(f"| {r.method} | {r.global_batch} | {r.steps} ({r.rounds}) | {r.lr:g} | {100 * r.test_mean:.2f}"
                         f"{std}{runs} | {r.gap_pp:+.2f} | {r.train_loss:.4f} |")
        lines.append("")
    return "\n".join(lines)


def goal_check(summary: pd.DataFrame) -> list[str]:
    """The issue's criteria at equal epochs, stated plainly."""
    eq = summary[summary.budget == "equal-epochs"].set_index("method")
    if "small" not in eq.index or "large" not in eq.index:
        return ["goal: not evaluated (needs small and large at equal epochs)"]
    small, large = 100 * eq.loc["small", "test_mean"], 100 * eq.loc["large", "test_mean"]
    done = small - large >= DONE_GAP_PP
    lines = [f"equal epochs: small {small:.2f}%, plain large {large:.2f}%: gap {small - large:.2f} points "
             f"(benchmark needs >= {DONE_GAP_PP}): {'a real gap' if done else 'NO real gap'}"]
    teachers = eq.drop(index=["small", "large"])
    if len(teachers):
        best = teachers["test_mean"].idxmax()
        gap = small - 100 * teachers.loc[best, "test_mean"]
        reached = done and gap <= GOAL_PP
        lines.append(f"best teacher: {best} {100 * teachers.loc[best, 'test_mean']:.2f}% ({gap:.2f} points below "
                     f"small; goal <= {GOAL_PP} at 16x batch and 16x fewer steps): goal {'REACHED' if reached else 'NOT reached'}")
    return lines


def plot(summary: pd.DataFrame, learned: pd.DataFrame | None, path: Path) -> None:
    """Test accuracy per method (mean +- std) for each budget, and the learned gains over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(summary.budget))
    panels = len(budgets) + (1 if learned is not None and len(learned) else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        s = summary[summary.budget == budget]
        ax.bar(s.method, 100 * s.test_mean, yerr=100 * s.test_std.fillna(0), capsize=3,
               color=["tab:green" if m == "small" else "tab:gray" if m == "large" else "tab:blue" for m in s.method])
        if "small" in set(s.method):
            ref = 100 * s[s.method == "small"].test_mean.iloc[0]
            ax.axhline(ref - GOAL_PP, color="tab:green", lw=0.8, ls="--", label=f"small - {GOAL_PP} pp (goal)")
            ax.legend(fontsize=7, loc="lower left")
        ax.set_title(budget)
        ax.set_ylabel("test accuracy (%)")
        lo = 100 * (s.test_mean - s.test_std.fillna(0)).min()
        ax.set_ylim(max(0, lo - 4), 100 * s.test_mean.max() + 2)
        ax.tick_params(axis="x", rotation=45)
    if panels > len(budgets):
        ax = axes[0][-1]
        for col in [c for c in learned.columns if c.startswith("teacher_gain_")]:
            ax.plot(learned["round"], learned[col], label=col.removeprefix("teacher_gain_"), lw=1)
        ax.set_xlabel("round")
        ax.set_ylabel("learned gain (mean over seeds)")
        ax.set_yscale("log")
        ax.set_title("learned teacher: per-tensor gains")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def learned_gains(final: pd.DataFrame) -> pd.DataFrame | None:
    """The learned teacher's gains per round (mean over its evaluation seeds), from rounds.csv."""
    runs = final[(final.method == "learned") & (final.budget == "equal-epochs") & (final.error.fillna("") == "")]
    if runs.empty:
        return None
    frames = [pd.read_csv(Path(f) / "rounds.csv") for f in runs.folder]
    cols = [c for c in frames[0].columns if c.startswith("teacher_gain_")]
    return pd.concat(frames).groupby("round")[cols].mean().reset_index()
