"""Choosing centered-clip's radius on validation: ``cc-radius-scale`` (``bucket-size``, ``cc-drop-ratio``) per attack.

``python -m experiments.cc_radius [--datasets digits] [--seeds 3] [--scales 0.5,1,1.5,2] [--bucket-sizes 1]
[--drop-ratios 10] [--rounds 150] [--weight-decay WD] [--data-dir DIR] [--out DIR] [--csv cc_radius.csv]``

The setting of ``experiments.bench_byzantine`` (n = 20, the same attacks and fractions, the
product's server step). For every dataset and seed: the plain ``mean`` under every attack and
without one, and ``centered-clip`` at each radius scale (tau = scale x the b_i-weighted median
distance to the previous aggregate, ``cc-radius = 0``), each bucket size (clients averaged in
random buckets first, Karimireddy et al. 2022) and each drop ratio (clients beyond that many median
distances get no weight; 0 = off). A (scale, bucket size, drop ratio) is chosen per dataset on the
**validation** split: the one whose worst attack is least below the clean ``mean`` run
(mean over seeds). Writes ``<out>/<csv>`` (one row per run, atomically after each run)
and prints, per dataset, validation and test accuracy by scale and attack, and the choice.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd
import torch

from experiments.attacks import ATTACKS, CONDITIONS
from experiments.bench_byzantine import Bench, run_one
from experiments.byzantine_args import SCALES, add_weight_decay_arg, checked_weight_decay, grid_runs, overridden
from workloads.files import atomic_write_text


def sweep(datasets: list[str], seeds: int, scales: list[float], rounds: int, data_dir: str, csv: Path,
          buckets: tuple[int, ...] = (1,), drops: tuple[float, ...] = (10.0,),
          attacks: tuple[str, ...] = tuple(ATTACKS), weight_decay: float | None = None) -> pd.DataFrame:
    """Every run of the module docstring, progress printed; ``csv`` rewritten after every run."""
    rows, start = [], time.perf_counter()
    runs = [("mean", 0.0, 1, 0.0)] + [("centered-clip", s, b, r) for r in drops for b in buckets for s in scales]
    total = len(datasets) * seeds * len(attacks) * len(runs)
    for dataset in datasets:
        base = SCALES[dataset]
        scale = overridden(base, rounds, weight_decay=weight_decay)
        for seed in range(1, seeds + 1):
            bench = Bench.create(dataset, data_dir, seed)
            for attack in attacks:
                for aggregator, radius_scale, bucket, drop in runs:
                    row = run_one(bench, aggregator, attack, scale, radius_scale or 1.0, bucket, drop)
                    rows.append({**row, "radius_scale": radius_scale, "bucket_size": bucket})
                    print(f"[{len(rows)}/{total}] {dataset} seed {seed} {attack:<10} {aggregator:<13} "
                          f"scale {radius_scale:<4g} bucket {bucket} drop {drop:g} val {row['val_accuracy']:.4f} "
                          f"test {row['test_accuracy']:.4f} {row['status']} ({time.perf_counter() - start:.0f} s)",
                          flush=True)
                    atomic_write_text(csv, pd.DataFrame(rows).to_csv(index=False))
    return pd.DataFrame(rows)


def table(df: pd.DataFrame, dataset: str, split: str) -> tuple[str, pd.Series]:
    """Markdown: accuracy (%) mean +- std over seeds, row per (scale, bucket size, drop ratio) (scale 0 = mean),
    column per attack; and each row's worst drop (pp) below the clean ``mean`` run, on ``split``, indexed by them."""
    d = df[df.dataset == dataset]
    if "drop_ratio" not in d:  # run_one's cc_drop_ratio; older files wrote drop_ratio, the oldest neither (off)
        d = d.assign(drop_ratio=d["cc_drop_ratio"] if "cc_drop_ratio" in d else 0.0)
    col = f"{split}_accuracy"
    clean = 100 * d[(d.radius_scale == 0) & (d.attack == "clean")][col].mean()
    attacks = [a for a in CONDITIONS if a in set(d.attack)]
    lines = [f"| {split}: radius scale | " + " | ".join(attacks) + " | worst vs clean mean |",
             "| --- |" + " --- |" * (len(attacks) + 1)]
    worst = {}
    for key in sorted(set(zip(d.radius_scale, d.bucket_size, d.drop_ratio))):
        s, b, r = key
        run = d[(d.radius_scale == s) & (d.bucket_size == b) & (d.drop_ratio == r)]
        acc = {a: 100 * run[run.attack == a][col] for a in attacks}
        worst[key] = min(acc[a].mean() for a in attacks) - clean
        cells = [f"{acc[a].mean():.1f} ± {acc[a].std(ddof=1) if len(acc[a]) > 1 else 0.0:.1f}" for a in attacks]
        name = "mean" if s == 0 else (f"centered-clip x{s:g}" + (f", buckets of {b}" if b > 1 else "")
                                      + (f", drop beyond {r:g} medians" if r > 0 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {worst[key]:+.1f} |")
    return "\n".join(lines), pd.Series(worst)


def main(argv: list[str] | None = None) -> None:
    """Run the sweep, print the tables and the scale chosen on validation."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="digits")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--scales", default="0.5,1,1.5,2", help="comma-separated cc-radius-scale values (> 0)")
    p.add_argument("--bucket-sizes", default="1", help="comma-separated bucket-size values (>= 1; 1 = off)")
    p.add_argument("--drop-ratios", default="10", help="comma-separated cc-drop-ratio values (0 = off, or > 1)")
    p.add_argument("--attacks", default=",".join(ATTACKS),
                   help="comma-separated conditions of experiments.bench_byzantine; must include clean")
    p.add_argument("--rounds", type=int, default=150, help="rounds of every run; 0 = bench_byzantine's")
    add_weight_decay_arg(p)
    p.add_argument("--data-dir", default=os.environ.get("FLB_DATA_DIR", ""))
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--csv", default="cc_radius.csv", help="file name of the rows, in --out")
    args = p.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",") if s]
    if not scales or min(scales) <= 0:
        raise SystemExit(f"--scales = {args.scales!r}: need one or more values > 0")
    parts = [b for b in args.bucket_sizes.split(",") if b]
    if not parts or not all(b.isdigit() and int(b) >= 1 for b in parts):
        raise SystemExit(f"--bucket-sizes = {args.bucket_sizes!r}: need one or more integers >= 1")
    buckets = tuple(int(b) for b in parts)
    drops = tuple(float(r) for r in args.drop_ratios.split(",") if r)
    if not drops or any(r != 0 and r <= 1 for r in drops):
        raise SystemExit(f"--drop-ratios = {args.drop_ratios!r}: need one or more values, each 0 (off) or > 1")
    datasets = [d for d in args.datasets.split(",") if d]
    bad = [d for d in datasets if d not in SCALES]
    if bad:
        raise SystemExit(f"--datasets: {bad[0]!r} is not one of {', '.join(SCALES)}")
    try:
        attacks = tuple(a for _, a in grid_runs("mean", args.attacks))
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if "clean" not in attacks:
        raise SystemExit(f"--attacks = {args.attacks!r}: needs 'clean', the reference of every other column")
    checked_weight_decay(args.weight_decay)
    torch.set_num_threads(1)
    df = sweep(datasets, args.seeds, scales, args.rounds, args.data_dir, Path(args.out) / args.csv, buckets, drops,
               attacks, args.weight_decay)
    for dataset in datasets:
        val, worst = table(df, dataset, "val")
        test, _ = table(df, dataset, "test")
        chosen = worst.drop((0.0, 1, 0.0)).idxmax()
        print(f"\n{dataset}, {args.seeds} seeds\n{val}\n\n{test}\n\nchosen on validation: cc-radius-scale "
              f"{chosen[0]:g}, bucket-size {chosen[1]}, cc-drop-ratio {chosen[2]:g} "
              f"(worst attack {worst[chosen]:+.1f} pp against clean mean)")


if __name__ == "__main__":
    main()
