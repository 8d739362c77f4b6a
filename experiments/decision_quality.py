"""Decision quality of the performance model: its batch against a sweep of global batches.

``python -m experiments.decision_quality [--seeds 3] [--target 0.9] [--rounds 150] [--quick]``

Task: digits, MLP, 6 clients on three simulated device kinds (memory budget, speed relative
to this machine, link), the AdaScale teacher (it rescales the learning rate with the measured
gain, so one learning rate serves every batch), constant schedule after a 2-round warm-up.

1. **Learning rate, on validation.** At the teacher's small batch (64), seed 0, the grid
   below; the best final validation accuracy wins. The test split is not looked at.
2. **Sweep.** ``batch-policy=fixed`` at every B = 2^k from 8 to 1024 (even split), seeds 1..S.
3. **The model's choice.** ``batch-policy=optimal``: probe, 2 calibration rounds at B = 64 that
   measure the noise scale, then ``choose_batch`` (least predicted time to a target); its
   calibration rounds count in its time.

For each run: the virtual time (``virtual_total_s``: measured compute scaled by the profiles'
speeds, plus links and the server) at the first round whose test accuracy reaches the target.
Reported: mean +- std per B, the best B of the sweep, the optimal policy's time, and the last
line ``ratio=<x>``: the optimal policy's mean time over the best sweep mean (goal <= 1.05).
Every run goes through ``flb.sweep`` and is cached as flb caches every run: one results folder
per run under ``<out>/runs``, named by a digest of its full config; a finished run is read back
instead of trained again, and an interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

import flb
from workloads.files import atomic_write_text

CLIENTS = 6
PROFILES = "phone:0.45:0.01:20:60,tablet:1:0.05:50:30,laptop:0:1:100:10"  # MiB : speed : Mbit/s : ms
BASE = {"dataset": "digits", "model": "mlp", "teacher": "adascale", "teacher-small-batch": 64,
        "schedule": "constant", "warmup-rounds": 2, "eval-every": 1, "device-profiles": PROFILES}
LR_GRID = (0.05, 0.1, 0.2, 0.4, 0.8)
SWEEP = tuple(2**k for k in range(3, 11))  # 8 .. 1024
OPTIMAL = {"global-batch-size": 64, "batch-policy": "optimal", "calibration-rounds": 2}


def train(labels: list[str], points: list[dict], seed: int, base: dict, out: Path) -> list[flb.Run]:
    """Run (or read back from ``<out>/runs``) every point with ``seed``; print the runs trained."""
    runs = flb.sweep(points, seeds=[seed], base=base, clients=CLIENTS, out=out / "runs", progress=False).runs
    for label, run in zip(labels, runs):
        if not run.cached:
            f = run.final
            print(f"  {label:<28} final val {f['val_accuracy']:.3f} test {f['test_accuracy']:.3f} "
                  f"B {int(f['global_batch'])}  ({f['wall_s']:.0f} s)", flush=True)
    return runs


def time_to_target(rounds: pd.DataFrame, target: float) -> tuple[float, float]:
    """(virtual seconds, rounds) at the first round with test accuracy >= target; inf if never."""
    for rnd, t, acc in zip(rounds["round"], rounds["virtual_total_s"], rounds["test_accuracy"]):
        if rnd > 0 and not math.isnan(acc) and acc >= target:
            return float(t), float(rnd)
    return math.inf, math.inf


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=None, help="test accuracy to reach (default 0.9; --quick 0.5)")
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("results/decision_quality"))
    parser.add_argument("--quick", action="store_true", help="smoke: 2 LRs, B in {16, 256}, 1 seed, 8 rounds, target 0.5")
    args = parser.parse_args(argv)
    args.target = args.target or (0.5 if args.quick else 0.9)
    if not 0 < args.target < 1:
        parser.error(f"--target {args.target}: allowed 0 < target < 1")
    lr_grid, sweep, seeds = (LR_GRID[1:3], (16, 256), 1) if args.quick else (LR_GRID, SWEEP, args.seeds)
    rounds = 8 if args.quick else args.rounds
    args.out.mkdir(parents=True, exist_ok=True)
    base = BASE | {"num-server-rounds": rounds}

    print(f"1. learning rate on validation (B=64, seed 0, {rounds} rounds)")
    tuned = train([f"tune-lr{lr}" for lr in lr_grid], [{"global-batch-size": 64, "lr": lr} for lr in lr_grid], 0, base, args.out)
    val = {lr: run.final["val_accuracy"] for lr, run in zip(lr_grid, tuned)}
    lr = max(val, key=val.get)
    print(f"   chosen lr={lr} (validation {val[lr]:.3f})")

    rows = []
    print(f"2. sweep over B, seeds 1..{seeds}; 3. batch-policy=optimal")
    for seed in range(1, seeds + 1):
        labels = [f"fixed-B{B}-s{seed}" for B in sweep] + [f"optimal-s{seed}"]
        runs = train(labels, [{"global-batch-size": B} for B in sweep] + [OPTIMAL], seed, base | {"lr": lr}, args.out)
        for B, run in zip(sweep, runs):
            rows.append({"policy": f"fixed B={B}", "B": B, "seed": seed,
                         **dict(zip(("time_s", "rounds"), time_to_target(run.rounds, args.target)))})
        rows.append({"policy": "optimal", "B": int(runs[-1].final["global_batch"]), "seed": seed,
                     **dict(zip(("time_s", "rounds"), time_to_target(runs[-1].rounds, args.target)))})
    df = pd.DataFrame(rows)
    atomic_write_text(args.out / "decision_quality.csv", df.to_csv(index=False))

    summary = df.groupby("policy", sort=False).agg(B=("B", "median"), time_mean=("time_s", "mean"), time_std=("time_s", "std"),
                                                  rounds_mean=("rounds", "mean"), reached=("time_s", lambda s: int(np.isfinite(s).sum())))
    print(f"\nvirtual seconds to test accuracy >= {args.target} (mean +- std over {seeds} seed(s)):")
    print(summary.to_string(float_format=lambda v: f"{v:.2f}"))
    sweep_rows = summary[summary.index != "optimal"]
    best = sweep_rows["time_mean"].idxmin()
    ratio = float(summary.loc["optimal", "time_mean"] / sweep_rows.loc[best, "time_mean"])
    print(f"best of the sweep: {best} ({sweep_rows.loc[best, 'time_mean']:.2f} s); optimal chose B="
          f"{sorted(set(df[df.policy == 'optimal'].B))} ({summary.loc['optimal', 'time_mean']:.2f} s)")
    print(f"ratio={ratio:.4f}")
    return ratio


if __name__ == "__main__":
    main()
