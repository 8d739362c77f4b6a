"""Read results folders into one tidy DataFrame, summarise over seeds, and plot comparisons.

>>> df = flb.load("results/runs/*")                 # or a list of folders, or a Sweep's runs
>>> flb.summarize(df, by="teacher")                 # final test accuracy, mean +- std over seeds
>>> flb.plot(df, x="samples_seen", by="teacher")    # curves against examples seen (equal epochs)
>>> flb.time_to_accuracy(rounds, target=0.9, train_examples=1617)  # first round at 90%, its virtual s, epochs

``load`` puts every run's ``rounds.csv`` rows together with its config as columns: the config
keys keep their kebab-case names (``teacher``, ``global-batch-size``, ``seed``), the round's
columns their snake-case ones, and the round's applied learning rate is ``step_lr`` (the
config's peak rate is ``lr``). ``run`` is the results folder.
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

X_AXES = ("round", "samples_seen", "virtual_total_s", "wall_s")


def _folders(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for item in items:
        if hasattr(item, "folder"):  # a flb.Run
            item = item.folder
        matches = sorted(glob.glob(str(item))) if any(ch in str(item) for ch in "*?[") else [str(item)]
        out += [Path(m) for m in matches if (Path(m) / "rounds.csv").exists()]
    return out


def load(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Every round of every results folder in ``paths`` (folders, globs or ``flb.Run``), with its config."""
    frames = []
    for folder in _folders(paths):
        rounds = pd.read_csv(folder / "rounds.csv").rename(columns={"lr": "step_lr"})
        config = json.loads((folder / "config.json").read_text())["run_config"]
        for key, value in config.items():
            rounds[key] = value
        rounds["run"] = str(folder)
        frames.append(rounds)
    if not frames:
        raise FileNotFoundError(f"no results folders (with rounds.csv) in {paths!r}")
    return pd.concat(frames, ignore_index=True)


def summarize(df: pd.DataFrame, by: str | Sequence[str] = "teacher", metric: str = "test_accuracy") -> pd.DataFrame:
    """``metric`` at each run's last round where it was measured, mean +- std over the runs of a group.

    Returns one row per group with ``mean``, ``std``, ``runs`` (count) and the seeds.
    """
    by = [by] if isinstance(by, str) else list(by)
    measured = df.dropna(subset=[metric])
    last = measured.loc[sorted(measured.groupby("run")["round"].idxmax())]  # groups keep the order of df
    out = last.groupby(by, sort=False).agg(mean=(metric, "mean"), std=(metric, "std"), runs=(metric, "size"),
                                           seeds=("seed", lambda s: sorted(s.tolist())))
    return out.reset_index()


@dataclass(frozen=True)
class TargetHit:
    """When a run first reached a target accuracy (``round`` None and NaNs when it never did)."""

    round: int | None  # first evaluated round with accuracy >= target
    virtual_total_s: float  # the virtual clock at the end of that round, s
    epochs: float  # samples_seen / train examples at that round


def time_to_accuracy(rounds: pd.DataFrame, target: float, train_examples: int,
                     metric: str = "test_accuracy") -> TargetHit:
    """The first evaluated round of one run whose ``metric`` is at least ``target``.

    ``rounds`` is the run's ``rounds.csv`` (columns ``round``, ``metric``, ``virtual_total_s``,
    ``samples_seen``); rows without ``metric`` (not evaluated) are skipped. Epochs are
    ``samples_seen / train_examples``. Never reached: ``TargetHit(None, nan, nan)``.
    """
    if train_examples <= 0:
        raise ValueError(f"train_examples = {train_examples!r}: must be > 0")
    measured = rounds.dropna(subset=[metric]).sort_values("round")
    hits = measured[measured[metric] >= target]
    if hits.empty:
        return TargetHit(None, math.nan, math.nan)
    first = hits.iloc[0]
    return TargetHit(int(first["round"]), float(first["virtual_total_s"]),
                     float(first["samples_seen"]) / train_examples)


def plot(df: pd.DataFrame, y: str = "test_accuracy", x: str = "round", by: str | Sequence[str] = "teacher", ax=None):
    """Mean (line) +- std (band) of ``y`` over seeds against ``x``, one line per group; returns the axes.

    ``x = "round"`` compares at equal iterations, ``"samples_seen"`` at equal examples (epochs),
    ``"virtual_total_s"`` at equal time on the simulated devices. Without ``device-profiles``
    the virtual clock is this host's measured time, jitter included: the plot says so.
    """
    import matplotlib.pyplot as plt

    if x not in X_AXES:
        raise ValueError(f"x = {x!r} is not allowed; allowed: {', '.join(X_AXES)}")
    by = [by] if isinstance(by, str) else list(by)
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    data = df.dropna(subset=[y])
    for key, group in data.groupby(by, sort=False):
        label = ", ".join(f"{k}={v}" for k, v in zip(by, key if isinstance(key, tuple) else (key,)))
        stats = group.groupby("round").agg(x=(x, "mean"), mean=(y, "mean"), std=(y, "std")).sort_values("x")
        ax.plot(stats["x"], stats["mean"], marker="o", markersize=3, label=label)
        ax.fill_between(stats["x"], stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0), alpha=0.2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    title = f"{y} (mean +- std over seeds)"
    if x == "virtual_total_s" and "device-profiles" in df and (df["device-profiles"] == "").any():
        title += "\nno device-profiles: the virtual clock is this host's time"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return ax
