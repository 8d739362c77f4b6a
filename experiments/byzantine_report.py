"""Tables, the plot and the ``--quick`` line of ``experiments.bench_byzantine``, from its rows (one per run)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from experiments.attacks import ABSENT, CONDITIONS, N_CLIENTS
from workloads.config import AGGREGATORS
from workloads.files import atomic_save_figure


def conditions_in(attacks: Iterable[str]) -> list[str]:
    """The conditions (``experiments.attacks.CONDITIONS``) present in ``attacks``, in the benchmark's order."""
    present = set(attacks)
    return [a for a in CONDITIONS if a in present]


def quick_line(df: pd.DataFrame) -> str:
    """``clean=<acc> mean_alie=<acc> cc_alie=<acc> mean_ipm=<acc> cc_ipm=<acc>`` (test accuracy, mean over seeds)."""
    acc = df.groupby(["aggregator", "attack"])["test_accuracy"].mean()
    keys = {"clean": ("mean", "clean"), "mean_alie": ("mean", "alie"), "cc_alie": ("centered-clip", "alie"),
            "mean_ipm": ("mean", "ipm"), "cc_ipm": ("centered-clip", "ipm")}
    return " ".join(f"{k}={acc[v]:.4f}" for k, v in keys.items())


def summary(df: pd.DataFrame, dataset: str) -> str:
    """A markdown table of test accuracy (%) mean +- std over seeds, aggregator x attack; ``*k``: k runs failed."""
    d = df[df.dataset == dataset]
    attack_names = conditions_in(d.attack)
    lines = ["| aggregator | " + " | ".join(f"{a} (f={CONDITIONS[a]})" for a in attack_names) + " |",
             "| --- |" + " --- |" * len(attack_names)]
    for agg in [a for a in AGGREGATORS if a in set(d.aggregator)]:
        cells = []
        for attack in attack_names:
            runs = d[(d.aggregator == agg) & (d.attack == attack)]
            acc, failed = 100 * runs.test_accuracy, int((runs.status != "ok").sum())
            cell = f"{acc.mean():.1f} ± {acc.std(ddof=1) if len(acc) > 1 else 0.0:.1f}" if len(runs) else ""
            cells.append(cell + (f" *{failed}" if failed else ""))
        lines.append(f"| {agg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_gaps(df: pd.DataFrame, dataset: str, aggregator: str = "centered-clip", split: str = "test",
                reference: tuple[str, str] = ("mean", "clean"), floor: bool = False) -> pd.DataFrame:
    """Per attack, ``aggregator``'s accuracy minus the ``reference`` run's of the same seed, in points.

    Columns: ``seeds``, ``gap`` (mean over seeds), ``low`` and ``high`` (the 95% Student-t interval
    of that mean, ``gap -+ t_{0.975, n-1} * sd / sqrt(n)``; NaN with one seed) and ``worst_seed``.
    Pairing by seed removes what the two runs share (partition, initial model, batch order).
    ``split``: ``"test"`` or ``"val"``. ``floor``: each attack of f clients is compared instead with
    ``reference[0]``'s run without those f clients (``absent-f``), which leaves the attack's own harm
    and not the missing data's.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split = {split!r}: must be 'test' or 'val'")
    d = df[(df.dataset == dataset) & (df.status == "ok")]
    col = f"{split}_accuracy"

    def by_seed(agg: str, attack: str) -> pd.Series:
        return d[(d.aggregator == agg) & (d.attack == attack)].groupby("seed")[col].mean()

    absent_of = {f: name for name, f in ABSENT.items()}  # f -> the condition without those f clients
    rows = []
    for attack in conditions_in(d.attack):
        if floor and (attack in ABSENT or CONDITIONS[attack] not in absent_of):
            continue
        ref = by_seed(reference[0], absent_of[CONDITIONS[attack]] if floor else reference[1])
        gaps = 100 * (by_seed(aggregator, attack) - ref).dropna()
        if gaps.empty:
            continue
        n, mean = len(gaps), float(gaps.mean())
        half = stats.t.ppf(0.975, n - 1) * gaps.std(ddof=1) / np.sqrt(n) if n > 1 else np.nan
        rows.append({"attack": attack, "seeds": n, "gap": mean, "low": mean - half, "high": mean + half,
                     "worst_seed": float(gaps.min())})
    return pd.DataFrame(rows, columns=["attack", "seeds", "gap", "low", "high", "worst_seed"])


def gap_table(gaps: pd.DataFrame, goal_pp: float = 1.0) -> str:
    """Markdown of ``paired_gaps``: within ``goal_pp`` when the mean gap is >= -goal_pp; the interval says how sure."""
    lines = ["| attack | seeds | gap (points) | 95% interval | worst seed | within the goal |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in gaps.itertuples():
        verdict = "yes" if r.gap >= -goal_pp else "no"
        if r.seeds < 2:
            verdict += " (one seed)"
        elif r.low < -goal_pp <= r.high:  # the seeds run cannot tell
            verdict += " (interval crosses)"
        interval = f"[{r.low:+.2f}, {r.high:+.2f}]" if r.seeds > 1 else "none"
        lines.append(f"| {r.attack} | {r.seeds} | {r.gap:+.2f} | {interval} | "
                     f"{r.worst_seed:+.2f} | {verdict} |")
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path) -> bool:
    """Bars of test accuracy (mean +- std over seeds) per attack and aggregator, one panel per dataset."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    datasets = list(dict.fromkeys(df.dataset))
    fig, axes = plt.subplots(len(datasets), 1, figsize=(10, 4.2 * len(datasets)), squeeze=False)
    for ax, dataset in zip(axes[:, 0], datasets):
        acc = df[df.dataset == dataset].groupby(["attack", "aggregator"])["test_accuracy"].agg(["mean", "std"])
        attack_names = conditions_in(acc.index.get_level_values(0))
        aggs = [a for a in AGGREGATORS if a in acc.index.get_level_values(1)]
        width = 0.8 / len(aggs)
        for j, agg in enumerate(aggs):
            rows = [acc.loc[(a, agg)] if (a, agg) in acc.index else pd.Series({"mean": np.nan, "std": 0.0})
                    for a in attack_names]
            ax.bar(np.arange(len(attack_names)) + j * width, [100 * r["mean"] for r in rows], width,
                   yerr=[100 * (0.0 if np.isnan(r["std"]) else r["std"]) for r in rows], label=agg, capsize=2)
        ax.set_xticks(np.arange(len(attack_names)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{a}\n(f={CONDITIONS[a]})" for a in attack_names])
        ax.set_ylabel("final test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.axhline(10, color="grey", linestyle=":", linewidth=1)  # chance: 10 classes
        ax.set_title(f"{dataset}: n = {N_CLIENTS} clients, partitions 0..f-1 Byzantine, seeds {sorted(set(df.seed))}")
        ax.legend(fontsize=8, ncol=len(aggs), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True
