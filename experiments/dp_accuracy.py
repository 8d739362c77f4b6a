"""Test accuracy at equal rounds with client-level DP at several epsilons, against no DP.

``python -m experiments.dp_accuracy [--epsilons 1,4,8] [--seeds 1,2,3] [--out DIR]``

Digits, MLP, 100 virtual clients, 50 a round (sampling rate q = 0.5), B = 400 (b_i = 8), 40
rounds, the default lr schedule (0.3, cosine, momentum 0.9), clip C = 0.5, delta 1e-5
(docs/privacy.md). Each DP arm sets ``dp-target-epsilon``: z is chosen before round 1 with
Opacus (RDP) so that epsilon after 40 rounds is at most the target. Every run is the real
ServerApp and ClientApp in this process (``flb.inprocess.run_inprocess``), 2 nodes carrying the
100 virtual clients. Prints one row per arm (test accuracy mean +- std over seeds, z, the
final epsilon) and writes ``<out>/dp_accuracy.csv`` (one row per run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from flb.inprocess import run_inprocess
from workloads.files import atomic_write_text

BASE = {"dataset": "digits", "virtual-clients": 100, "clients-per-round": 50, "global-batch-size": 400,
        "num-server-rounds": 40, "eval-every": 40, "lr": 0.3, "warmup-rounds": 2}
CLIP = 0.5


def run_arm(epsilon: float, seed: int, root: Path) -> dict:
    """One run: no DP when ``epsilon`` is 0, else DP with ``dp-target-epsilon = epsilon``; its CSV row."""
    t0 = time.perf_counter()
    cfg = BASE | {"seed": seed, "out-dir": str(root / f"eps{epsilon:g}-s{seed}")}
    if epsilon:
        cfg |= {"dp-clip-norm": CLIP, "dp-target-epsilon": epsilon, "dp-noise-seed": seed}
    folder = run_inprocess(cfg, num_clients=2)
    rounds = pd.read_csv(folder / "rounds.csv")
    last = rounds.iloc[-1]
    return {"epsilon_target": epsilon or float("inf"), "seed": seed, "test_accuracy": float(last["test_accuracy"]),
            "dp_epsilon": float(last["dp_epsilon"]) if "dp_epsilon" in rounds and epsilon else float("inf"),
            "z": float(last["dp_noise_multiplier"]) if "dp_noise_multiplier" in rounds and epsilon else 0.0,
            "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run every arm and seed; print the table and write the CSV."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epsilons", default="1,4,8", help="DP targets; the no-DP arm always runs")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--out", default="experiments/results")
    args = p.parse_args(argv)
    epsilons = [0.0] + [float(e) for e in args.epsilons.split(",") if e]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out)
    rows = []
    for eps in epsilons:
        for seed in seeds:
            rows.append(run_arm(eps, seed, out / "runs" / "dp_accuracy"))
            r = rows[-1]
            print(f"epsilon target {r['epsilon_target']:g} seed {seed}: test {r['test_accuracy']:.4f} "
                  f"z {r['z']:.3f} epsilon {r['dp_epsilon']:.3f} ({r['wall_s']:.0f} s)", flush=True)
    df = pd.DataFrame(rows)
    atomic_write_text(out / "dp_accuracy.csv", df.to_csv(index=False, float_format="%.6g"))
    table = df.groupby("epsilon_target", sort=False).agg(
        test_mean=("test_accuracy", "mean"), test_std=("test_accuracy", "std"), z=("z", "mean"),
        epsilon=("dp_epsilon", "max"), runs=("seed", "count"))
    print(table.to_string(float_format=lambda x: f"{x:.4f}"))
    return df


if __name__ == "__main__":
    main()
