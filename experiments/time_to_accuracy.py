"""Time to accuracy: rounds and fleet seconds until small batch's accuracy, per batch method.

``python -m experiments.time_to_accuracy --data-dir DIR [--methods m1,m2] [--seeds 1,2,3,4,5] [--tune]``
``python -m experiments.time_to_accuracy --report`` (train nothing: summarise the runs finished so far)

The setting is the gap search's (``experiments/gap_search.py``, ``gap_search_runs.jsonl``): CIFAR-10,
model ``cnn`` (no normalisation layers), a fixed subset of 5,000 training images, 40 epochs, no
augmentation, server SGD with momentum 0.9 and weight decay 5e-4, warm-up over 5% of the rounds.
Every method sees the same 200,000 examples (equal epochs); what differs is the global batch B_r
of each round and the learning-rate schedule:

- ``small``: B = 32, cosine (6,250 rounds). ``large``: B = 512, cosine (391 rounds).
- ``batch-step``: Smith et al. 2018, the batch grows where a step schedule would decay the
  learning rate: B = 64, 128, 256, 512 over the four quarters of the epochs (1,465 rounds),
  constant learning rate after warm-up. ``batch-step-cosine``: the same batches, cosine decay.
  ``batch-step-128``: B = 128, 256, 512, 1,024 (733 rounds), constant; at twice the learning
  rate its first phase has batch-step's noise scale lr/B (Smith et al.'s "increase lr and B").
- ``batch-noise``: B_r from the gradient noise scale (McCandlish et al. 2018), the product's
  ``batch-policy = noise`` rule until it averaged tr(Sigma) and |mu|^2 apart (``ratio_ema``: the EMA
  of each round's B_simple, ``noise_batch``, batch-ema 0.9): from 32, never
  shrinking, capped at 512; B_simple measured every round from 8 clients' gradients
  (``noise_stats``); constant learning rate after warm-up. ``batch-noise-warm``: the same rule,
  but B_simple measured during the learning-rate warm-up is not used (the estimate swings from
  520 to 1,250 in batch-noise's first 100 rounds, then settles at 85-180), so B stays 32 until then.
  ``batch-noise-follow``: as batch-noise-warm, but B_r is the clamped EMA, free to shrink (Pollux
  re-chooses the batch as the noise scale changes rather than only growing it).
  ``batch-noise-moments``: the product's ``noise`` rule now: as batch-noise-warm, but tr(Sigma)
  and |mu|^2 are averaged apart and E is their ratio (``noise_moments``; McCandlish et al. App. A).
- ``post-local``: Lin et al. 2020 with the product's teacher defaults: B = 512 rounds for half the
  epochs, then rounds of H = 16 local steps on 16 clients of 32 examples (small batch's b), the
  weights and velocities averaged after each (``local_round``); cosine over all sequential steps
  (391, as large). Its local rounds are not union-batch steps; each costs 16 steps of compute on
  the fleet's first 16 devices and sends weights and velocity (``FleetClock.local``).
  ``local-sgd``: the same local rounds from the first round (25 rounds).
- ``batch-step-local``: batch-step's 1,467 steps, the same batches in the same order, taken in
  local rounds of H = 8 steps on 8 clients, each step's batch split evenly over them (8 to 64
  examples a client), weights and velocities averaged after each round (185 rounds). The
  product's ``post-local`` teacher with ``teacher-switch = 0`` and ``batch-policy = step``. With
  H = 1 its rounds are batch-step's steps (tested). ``batch-step-local-4`` and ``-2``: rounds of
  H = 4 and 2 steps.
- ``batch-step-fedavgm-2``: as batch-step-local-2, but the clients take plain SGD steps and send
  their weights only; the server applies its momentum and weight decay to the mean
  pseudo-gradient (w_0 - w_H) / lr (FedAvgM, Hsu et al. 2019; the product's ``local-steps = 2``
  with ``batch-policy = step``). A round uploads the model once, not twice.

Each round but the local ones is computed centrally as the union batch of its clients.
Without BatchNorm that is exactly the federated step (the weighted mean of the clients' mean
gradients, one server SGD step; tested in ``tests/test_equivalence.py``), so the accuracy curves
are the app's. The setting and the methods are in ``experiments/tta_methods.py``, the clock and
the training runs in ``experiments/tta_training.py``.

The virtual clock is a 64-device fleet (``FLEET``: four device kinds, their speed and link), the
round's B split over min(64, B) devices so that they finish together (``split_for_equal_finish``),
each device's step time ``IterTimeModel`` measured once on this machine (``--calibrate``, stored in
``<out>/time_to_accuracy_clock.json``), plus the fixed per-round latency of real SuperNodes
measured on the local rehearsal (``ROUND_LATENCY_S`` = 11.7 s, docs/deploy.md).

Protocol. Learning rates are chosen on the validation split with seed 0: ``small`` and ``large``
take the gap search's choice (a window of five or more values a factor 2 apart), the others
``--tune`` over three (``TUNE_LRS``). Seeds 1-5 then run at the chosen rate. The target is small
batch's mean final **validation** accuracy less 0.5 pp; a run reaches it at the first evaluation
(every ``EVAL_EPOCHS`` epochs) whose validation accuracy is at least that, and a method at the
first evaluation where its validation accuracy averaged over the seeds is (the goal check uses
this: with seeds spread by about 0.6 pp, some of small batch's own runs end below its mean less
0.5 pp, so "every seed" would fail small batch itself). Every finished run is
one JSON file in ``<out>/time_to_accuracy_runs/`` (written atomically), so an interrupted study
resumes; ``--report`` writes ``time_to_accuracy.csv``, ``time_to_accuracy_curves.csv`` and
``docs/time_to_accuracy.png``, and prints the table and the goal check.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from experiments.tta_methods import (
    CHOSEN_LR, DATASET, EPOCHS, METHODS, MODEL, SEEDS, TARGET_MARGIN, TRAIN_LIMIT, TUNE_LRS,
)
from experiments.tta_training import FLEET, FleetClock, calibrate, train
from workloads.data import Splits, load_splits
from workloads.files import atomic_save_figure, atomic_write_json, atomic_write_text
from workloads.models import build_model
from workloads.registry import WORKLOADS


def run_path(out: Path, method: str, lr: float, seed: int) -> Path:
    """The JSON file of one run."""
    return out / "time_to_accuracy_runs" / f"{method}_lr{lr:g}_seed{seed}.json"


def load_runs(out: Path) -> list[dict]:
    """Every finished run under ``out``."""
    folder = out / "time_to_accuracy_runs"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


def chosen_lr(method: str, runs: list[dict]) -> float | None:
    """The validation choice: the fixed one of small and large, else the best seed-0 run of ``TUNE_LRS``."""
    if method in CHOSEN_LR:
        return CHOSEN_LR[method]
    tuned = {r["lr"]: r["final_val_accuracy"] for r in runs if r["method"] == method and r["seed"] == 0}
    if not all(lr in tuned for lr in TUNE_LRS):
        return None
    return max(TUNE_LRS, key=lambda lr: tuned[lr])


def ensure_run(out: Path, method: str, lr: float, seed: int, splits: Splits, clock: FleetClock) -> dict:
    """Train one run unless its file exists; print its line."""
    path = run_path(out, method, lr, seed)
    if path.exists():
        return json.loads(path.read_text())
    rec = train(METHODS[method], lr, seed, splits, clock)
    atomic_write_json(path, rec)
    print(f"{method:<18} lr {lr:<7g} seed {seed}  rounds {rec['rounds']:5d}  mean B {rec['mean_batch']:6.1f}  "
          f"val {rec['final_val_accuracy']:.4f}  test {rec['final_test_accuracy']:.4f}  "
          f"virtual {rec['virtual_s'] / 3600:6.2f} h  {rec['wall_s']:.0f} s{'  DIVERGED' if rec['diverged'] else ''}",
          flush=True)
    return rec


def first_hit(curve: list[dict], target: float) -> dict | None:
    """The first evaluation whose validation accuracy is at least ``target``."""
    return next((c for c in curve if c["val_accuracy"] >= target), None)


def results(runs: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Per-run rows at the chosen rates, their curves, and the target (validation accuracy)."""
    chosen = [r for r in runs if r["seed"] != 0 and r["lr"] == chosen_lr(r["method"], runs)]
    small = [r["final_val_accuracy"] for r in chosen if r["method"] == "small"]
    if not small:
        raise SystemExit("no finished small-batch run yet: the target is small batch's final validation accuracy")
    target = float(np.mean(small)) - TARGET_MARGIN
    rows, curves = [], []
    for r in chosen:
        hit = first_hit(r["curve"], target)
        rows.append({"method": r["method"], "seed": r["seed"], "lr": r["lr"],
                     "rounds_to_target": hit["round"] if hit else np.nan,
                     "virtual_s_to_target": hit["virtual_total_s"] if hit else np.nan,
                     "epochs_to_target": hit["samples_seen"] / TRAIN_LIMIT if hit else np.nan,
                     "final_test_accuracy": r["final_test_accuracy"], "final_val_accuracy": r["final_val_accuracy"],
                     "epochs": r["epochs"], "rounds": r["rounds"], "virtual_s": r["virtual_s"],
                     "mean_batch": r["mean_batch"], "diverged": r["diverged"]})
        curves += [{"method": r["method"], "seed": r["seed"], "eval": i, **c} for i, c in enumerate(r["curve"])]
    order = {m: i for i, m in enumerate(METHODS)}
    df = pd.DataFrame(rows).sort_values(["method", "seed"], key=lambda s: s.map(order) if s.name == "method" else s)
    return df.reset_index(drop=True), pd.DataFrame(curves), target


def mean_curve_hit(curves: pd.DataFrame, target: float) -> tuple[float, float]:
    """Round and fleet seconds at which the seed-mean validation curve first reaches ``target`` (NaN if never)."""
    m = curves.groupby("eval")[["round", "virtual_total_s", "val_accuracy"]].mean()
    hit = m[m.val_accuracy >= target]
    return (float(hit["round"].iloc[0]), float(hit.virtual_total_s.iloc[0])) if len(hit) else (np.nan, np.nan)


def summary(df: pd.DataFrame, curves: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per method: seeds, test accuracy mean and std (pp), runs reaching the target, and rounds and hours to it
    on the seed-mean validation curve (``curve_*``), the ratios to small batch's."""
    small = df[df.method == "small"]
    ref_acc = small.final_test_accuracy.mean()
    ref_rounds, ref_s = mean_curve_hit(curves[curves.method == "small"], target)
    out = []
    for method, d in df.groupby("method", sort=False):
        rounds, secs = mean_curve_hit(curves[curves.method == method], target)
        out.append({"method": method, "seeds": len(d), "lr": d.lr.iloc[0],
                    "test_pct": 100 * d.final_test_accuracy.mean(), "std_pp": 100 * d.final_test_accuracy.std(ddof=1),
                    "vs_small_pp": 100 * (d.final_test_accuracy.mean() - ref_acc),
                    "reached": int(d.rounds_to_target.notna().sum()), "rounds": d.rounds.mean(),
                    "curve_rounds": rounds, "curve_hours": secs / 3600,
                    "round_ratio": rounds / ref_rounds, "time_ratio": secs / ref_s})
    return pd.DataFrame(out)


def goal_lines(s: pd.DataFrame) -> list[str]:
    """The goal, method by method: the seed-mean curve reaches the target within 1/4 of small batch's rounds and
    fleet time, and the final test accuracy at equal epochs is within 0.5 pp of small batch's."""
    lines = []
    for r in s[s.method != "small"].itertuples():
        ok = r.round_ratio <= 0.25 and r.time_ratio <= 0.25 and r.vs_small_pp >= -0.5  # NaN compares False
        lines.append(f"{r.method}: seeds reaching {r.reached}/{r.seeds}, mean curve: rounds x{r.round_ratio:.3f}, "
                     f"time x{r.time_ratio:.3f} of small, final {r.vs_small_pp:+.2f} pp -> goal "
                     f"{'REACHED' if ok else 'not reached'}")
    return lines


def plot(curves: pd.DataFrame, target: float, path: Path) -> bool:
    """Validation accuracy against fleet hours, mean over seeds at each evaluation, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, d in curves.groupby("method", sort=False):
        m = d.groupby("eval")[["virtual_total_s", "val_accuracy"]].mean()
        ax.plot(m.virtual_total_s / 3600, 100 * m.val_accuracy, marker=".", label=method)
    ax.axhline(100 * target, color="grey", linestyle=":", label="target (small's final - 0.5 pp)")
    ax.set_xscale("log")
    ax.set_xlabel("virtual time on the 64-device fleet (hours, log)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"CIFAR-10 cnn, {TRAIN_LIMIT} images, {EPOCHS} epochs; mean over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True


def report(out: Path, plot_path: Path) -> pd.DataFrame:
    """Write the CSVs and the plot from the finished runs; print the table and the goal check."""
    df, curves, target = results(load_runs(out))
    atomic_write_text(out / "time_to_accuracy.csv", df.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "time_to_accuracy_curves.csv", curves.to_csv(index=False, float_format="%.6g"))
    s = summary(df, curves, target)
    print(f"target: validation accuracy {target:.4f} (small batch's mean final {target + TARGET_MARGIN:.4f} - 0.5 pp)")
    print(s.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("\n".join(goal_lines(s)))
    print("plot: " + (str(plot_path) if plot(curves, target, plot_path) else "skipped (matplotlib not installed)"))
    return s


def main(argv: list[str] | None = None) -> None:
    """Train the requested runs (tuning with --tune), or only report with --report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--tune", action="store_true", help="run the seed-0 tuning runs of the methods that tune")
    p.add_argument("--tune-lrs", default=",".join(map(str, TUNE_LRS)),
                   help="with --tune: only these of the tuning rates (to split tuning over processes)")
    p.add_argument("--report", action="store_true", help="train nothing; write the CSVs, the plot and the summary")
    p.add_argument("--data-dir", default=os.environ.get("FLB_DATA_DIR", ""))
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--plot", default="docs/time_to_accuracy.png")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.report:
        report(out, Path(args.plot))
        return
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: {bad[0]!r} is not one of {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    tune_lrs = [float(v) for v in args.tune_lrs.split(",") if v]
    if any(lr not in TUNE_LRS for lr in tune_lrs):
        raise SystemExit(f"--tune-lrs: {args.tune_lrs!r}: each must be one of {', '.join(map(str, TUNE_LRS))}")
    if not args.data_dir:
        raise SystemExit("--data-dir (or FLB_DATA_DIR): a folder with cifar10/ is needed (docs/data.md)")
    torch.set_num_threads(1)
    splits = load_splits(DATASET, args.data_dir, 0.1, TRAIN_LIMIT)
    w = WORKLOADS[DATASET]
    model_bytes = sum(t.numel() * 4 for t in build_model(MODEL, w.input_shape, w.num_classes, 0).state_dict().values())
    clock = FleetClock(calibrate(splits, out / "time_to_accuracy_clock.json"), model_bytes)
    print(f"fleet: {len(FLEET)} devices; round seconds at B = 32, 512: {clock(32):.2f}, {clock(512):.2f}", flush=True)
    for method in methods:
        if args.tune and method not in CHOSEN_LR:
            for lr in tune_lrs:
                ensure_run(out, method, lr, 0, splits, clock)
        lr = chosen_lr(method, load_runs(out))
        if lr is None:
            print(f"{method}: not tuned yet (run --tune first); its seeds skipped", flush=True)
            continue
        for seed in seeds:
            ensure_run(out, method, lr, seed, splits, clock)


if __name__ == "__main__":
    main()
