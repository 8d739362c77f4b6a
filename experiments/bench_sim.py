"""Simulation throughput against pure PyTorch doing the identical large-batch SGD.

``python -m experiments.bench_sim [--rounds 20] [--data-dir DIR]``

Both sides train the CPU CNN on CIFAR-10 with a global batch of 512, momentum SGD, the same
augmentation and the same number of steps, on this machine, in one invocation:

- simulation: ``flwr run`` through the launcher, 8 virtual clients of 64 examples each,
  Flower's Ray engine with ``client-resources-num-cpus=1``;
- reference: one Python process, one ``torch.optim.SGD`` step per 512-example batch.

Steady-state samples/s skip the first round (Ray actor start-up, imports) and the last
(central evaluation). The end-to-end figure for the simulation includes everything from the
launcher's start to its exit. The last line is ``sim_samples_per_s=<x> ref_samples_per_s=<y>
ratio=<x/y> end_to_end_ratio=<z>``.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import torch

from experiments.run import launch, prepare
from workloads.data import augment_crop_flip, load_splits
from workloads.models import build_model

GLOBAL_BATCH = 512
CLIENTS = 8


def reference_samples_per_s(data_dir: str, rounds: int, seed: int = 0) -> float:
    """Pure PyTorch: ``rounds`` SGD steps of 512 CIFAR-10 examples; samples/s of rounds 2..R-1."""
    splits = load_splits("cifar10", data_dir, 0.1)
    model = build_model("cnn", (3, 32, 32), 10, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(splits.y_train), generator=gen)
    stamps = []
    for step in range(rounds):
        idx = perm[(step * GLOBAL_BATCH) % len(perm):][:GLOBAL_BATCH]
        x = augment_crop_flip(splits.inputs(splits.x_train[idx]), gen)
        opt.zero_grad()
        loss_fn(model(x), splits.y_train[idx]).backward()
        opt.step()
        stamps.append(time.perf_counter())
    return GLOBAL_BATCH * (rounds - 2) / (stamps[-2] - stamps[0])


def simulation_samples_per_s(data_dir: str, rounds: int, out: Path) -> tuple[float, float]:
    """Run the simulation; return (steady-state samples/s, end-to-end samples/s)."""
    t0 = time.perf_counter()
    cfg, fed, out_dir = prepare(
        f"dataset='cifar10' model='cnn' data-dir='{data_dir}' global-batch-size={GLOBAL_BATCH} "
        f"num-server-rounds={rounds} eval-every={rounds} lr=0.05 warmup-rounds=0",
        f"num-supernodes={CLIENTS} client-resources-num-cpus=1",
        str(out),
    )
    if launch(cfg, fed, out_dir, quiet=True) != 0:
        raise SystemExit(f"simulation failed; see {out_dir / 'run.log'}")
    end_to_end = GLOBAL_BATCH * rounds / (time.perf_counter() - t0)
    with open(out_dir / "rounds.csv") as f:
        wall = {int(r["round"]): float(r["wall_s"]) for r in csv.DictReader(f)}
    steady = GLOBAL_BATCH * (rounds - 2) / (wall[rounds - 1] - wall[1])
    return steady, end_to_end


def main() -> None:
    """Print both throughputs and their ratio, measured in this run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--data-dir", default=os.environ.get("FLB_DATA_DIR", ""))
    args = parser.parse_args()
    if args.rounds < 4:
        raise SystemExit("--rounds must be at least 4 (first and last rounds are excluded)")
    with tempfile.TemporaryDirectory() as tmp:
        sim, e2e = simulation_samples_per_s(args.data_dir, args.rounds, Path(tmp) / "sim")
    ref = reference_samples_per_s(args.data_dir, args.rounds)
    print(f"{'what':<44}{'samples/s':>12}")
    print(f"{'simulation, steady state (rounds 2..R-1)':<44}{sim:>12.1f}")
    print(f"{'simulation, end to end (incl. start-up)':<44}{e2e:>12.1f}")
    print(f"{'pure PyTorch, one process':<44}{ref:>12.1f}")
    print(f"sim_samples_per_s={sim:.1f} ref_samples_per_s={ref:.1f} ratio={sim / ref:.3f} "
          f"end_to_end_ratio={e2e / ref:.3f}")


if __name__ == "__main__":
    main()
