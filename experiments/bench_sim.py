"""Simulation throughput against pure PyTorch doing the identical large-batch SGD.

``python -m experiments.bench_sim [--rounds 20] [--data-dir DIR]``

Both sides train the CPU CNN on CIFAR-10 with a global batch of 512, momentum SGD, the same
augmentation and the same number of steps, on this machine, in one invocation:

- simulation: ``flwr run`` through the launcher, 8 virtual clients of 64 examples each,
  Flower's Ray engine with ``client-resources-num-cpus=1``;
- reference: one Python process, one ``torch.optim.SGD`` step per 512-example batch; end to
  end, a fresh process that also loads the data and runs the app's two evaluations
  (validation and test before the first step and after the last).

The simulation runs four times: with an empty array cache (every process decodes nothing
but the first, workloads/cache.py), with the cache filled (the default configuration), with
the memory measured in every round (``memory-check-every=1``: a profiled replay per client
step), and with the 8 clients as ``virtual-clients`` packed onto 2 Flower nodes (one message
per actor a round instead of 8, protocol/packing.py). Steady-state samples/s skip the first round (Ray actor start-up, imports) and the
last (central evaluation, and by default the memory check). The simulation's end-to-end figure
includes everything from the launcher's start to its exit; its ratio is to the end-to-end
reference (``end_to_end_vs_steady_ref`` divides by the steady-state reference instead). ``--overhead`` adds the per-round time of
the Flower path (a node per client, and packed) against the same step in pure PyTorch for three
model sizes. The last line is
``sim_samples_per_s=<x> ref_samples_per_s=<y> ratio=<x/y> end_to_end_ratio=<z> ...``.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flb.launch.run import launch, prepare
from workloads.data import augment_crop_flip, load_splits
from workloads.models import build_model
from workloads.registry import WORKLOADS
from workloads.training import evaluate, step_seconds

GLOBAL_BATCH = 512
CLIENTS = 8
PACKED_NODES = 2  # the packed runs: CLIENTS virtual clients on this many Flower nodes (one per actor here)


def reference_samples_per_s(data_dir: str, rounds: int, seed: int = 0, evaluate_too: bool = False) -> float:
    """Pure PyTorch: ``rounds`` SGD steps of 512 CIFAR-10 examples; samples/s of rounds 2..R-1.

    ``evaluate_too``: also the app's evaluations (validation and test splits before the first
    step and after the last), as the end-to-end reference does.
    """
    splits = load_splits("cifar10", data_dir, 0.1)
    model = build_model("cnn", (3, 32, 32), 10, seed)
    loss_fn = torch.nn.CrossEntropyLoss()

    def evaluations() -> None:
        if evaluate_too:
            for x, y in ((splits.x_val, splits.y_val), (splits.x_test, splits.y_test)):
                evaluate(model, loss_fn, splits.inputs, x, y)

    evaluations()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
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
    evaluations()
    return GLOBAL_BATCH * (rounds - 2) / (stamps[-2] - stamps[0])


def reference_end_to_end_samples_per_s(data_dir: str, rounds: int) -> float:
    """Pure PyTorch end to end: a fresh Python process that imports torch, loads CIFAR-10 (from
    the filled cache), evaluates, takes ``rounds`` steps and evaluates again, as the app does."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "experiments.bench_sim", "--reference-process", "--rounds", str(rounds),
                    "--data-dir", data_dir], check=True, cwd=Path(__file__).resolve().parents[1])
    return GLOBAL_BATCH * rounds / (time.perf_counter() - t0)


def _simulate(data_dir: str, dataset: str, model: str, batch: int, rounds: int, nodes: int, out: Path,
              extra: str = "") -> dict[int, float]:
    """One ``flwr run`` of ``CLIENTS`` clients on ``nodes`` Flower nodes (packed as ``virtual-clients``
    when fewer); return each round's wall clock (``rounds.csv``)."""
    packed = f"virtual-clients={CLIENTS}" if nodes != CLIENTS else ""
    cfg, fed, out_dir, _ = prepare(
        f"dataset='{dataset}' model='{model}' data-dir='{data_dir}' global-batch-size={batch} "
        f"num-server-rounds={rounds} eval-every={rounds} warmup-rounds=0 {packed} {extra}",
        f"num-supernodes={nodes} client-resources-num-cpus=1", str(out))
    if launch(cfg, fed, out_dir, quiet=True) != 0:
        raise SystemExit(f"simulation failed; see {out_dir / 'run.log'}")
    with open(out_dir / "rounds.csv") as f:
        return {int(r["round"]): float(r["wall_s"]) for r in csv.DictReader(f)}


def simulation_samples_per_s(data_dir: str, rounds: int, out: Path, extra: str = "",
                             nodes: int = CLIENTS) -> tuple[float, float]:
    """Run the simulation; return (steady-state samples/s, end-to-end samples/s).

    ``nodes`` < ``CLIENTS``: the clients run as ``virtual-clients`` packed onto that many Flower nodes.
    """
    t0 = time.perf_counter()
    wall = _simulate(data_dir, "cifar10", "cnn", GLOBAL_BATCH, rounds, nodes, out, f"lr=0.05 {extra}")
    end_to_end = GLOBAL_BATCH * rounds / (time.perf_counter() - t0)
    steady = GLOBAL_BATCH * (rounds - 2) / (wall[rounds - 1] - wall[1])
    return steady, end_to_end


def _round_s(data_dir: str, dataset: str, model: str, batch: int, rounds: int, nodes: int) -> float:
    """Median seconds of a steady round (Ray, ``CLIENTS`` clients on ``nodes`` Flower nodes)."""
    with tempfile.TemporaryDirectory() as tmp:
        wall = list(_simulate(data_dir, dataset, model, batch, rounds, nodes, Path(tmp) / "sim").values())
    return sorted(b - a for a, b in zip(wall[2:-1], wall[3:-1]))[(rounds - 4) // 2] if rounds >= 5 else wall[-1] - wall[-2]


def overhead_table(data_dir: str, rounds: int = 6, batch: int = 64) -> list[dict]:
    """Per-round time of the Flower path (Ray, 8 clients; also packed onto 2 nodes) against the same step in pure PyTorch."""
    rows = []
    for dataset, model in (("mnist", "mlp"), ("cifar10", "cnn"), ("cifar10", "resnet18")):
        sim_s = _round_s(data_dir, dataset, model, batch, rounds, CLIENTS)
        packed_s = _round_s(data_dir, dataset, model, batch, rounds, PACKED_NODES)
        net = build_model(model, WORKLOADS[dataset].input_shape, 10, 0)
        splits = load_splits(dataset, data_dir, 0.1)
        inputs = lambda x, s=splits: s.inputs(x)  # noqa: E731
        ref_s = step_seconds(net, WORKLOADS[dataset].loss(), inputs, splits.x_train[:batch], splits.y_train[:batch])
        params = sum(p.numel() for p in net.parameters())
        rows.append({"model": model, "params_M": params / 1e6, "message_MB": params * 4 / 1e6, "sim_round_ms": 1000 * sim_s,
                     "pytorch_step_ms": 1000 * ref_s, "overhead_ms": 1000 * (sim_s - ref_s),
                     "packed_round_ms": 1000 * packed_s, "packed_overhead_ms": 1000 * (packed_s - ref_s)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    """Print the throughputs and their ratios, measured in this run (and, with --overhead, the table per model)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--data-dir", default=os.environ.get("FLB_DATA_DIR", ""))
    parser.add_argument("--overhead", action="store_true", help="also the per-round overhead against model size")
    parser.add_argument("--reference-process", action="store_true", help=argparse.SUPPRESS)  # the end-to-end reference
    args = parser.parse_args()
    if args.rounds < 4:
        raise SystemExit("--rounds must be at least 4 (first and last rounds are excluded)")
    if args.reference_process:
        reference_samples_per_s(args.data_dir, args.rounds, evaluate_too=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FLB_CACHE_DIR"] = str(Path(tmp) / "cache")  # empty: the first run decodes CIFAR-10 once
        cold, cold_e2e = simulation_samples_per_s(args.data_dir, args.rounds, Path(tmp) / "cold")
        sim, e2e = simulation_samples_per_s(args.data_dir, args.rounds, Path(tmp) / "sim")
        measured, measured_e2e = simulation_samples_per_s(args.data_dir, args.rounds, Path(tmp) / "measured",
                                                          "memory-check-every=1")
        packed, packed_e2e = simulation_samples_per_s(args.data_dir, args.rounds, Path(tmp) / "packed",
                                                      nodes=PACKED_NODES)
        ref_e2e = reference_end_to_end_samples_per_s(args.data_dir, args.rounds)
    ref = reference_samples_per_s(args.data_dir, args.rounds)
    print(f"{'what':<66}{'samples/s':>10}{'ratio':>8}  to")
    for label, value, to in (
            ("simulation, default, steady state (rounds 2..R-1)", sim, "steady"),
            ("simulation, memory measured every round, steady state", measured, "steady"),
            (f"simulation, virtual-clients={CLIENTS} on {PACKED_NODES} Flower nodes, steady state", packed, "steady"),
            ("pure PyTorch, one process, steady state", ref, "steady"),
            ("simulation, default, end to end (launcher start to exit, cache filled)", e2e, "end to end"),
            ("simulation, default, end to end, empty cache (decodes CIFAR-10)", cold_e2e, "end to end"),
            (f"simulation, virtual-clients={CLIENTS} on {PACKED_NODES} Flower nodes, end to end", packed_e2e, "end to end"),
            ("pure PyTorch, end to end (fresh process, data, same evaluations)", ref_e2e, "end to end")):
        print(f"{label:<66}{value:>10.1f}{value / (ref if to == 'steady' else ref_e2e):>8.3f}  {to}")
    if args.overhead:
        rows = overhead_table(args.data_dir)
        print(f"{'model':<10}{'params M':>10}{'message MB':>12}{'sim round ms':>14}{'PyTorch step ms':>17}{'overhead ms':>13}"
              f"{'packed round ms':>17}{'packed overhead':>17}")
        for r in rows:
            print(f"{r['model']:<10}{r['params_M']:>10.3f}{r['message_MB']:>12.2f}{r['sim_round_ms']:>14.1f}"
                  f"{r['pytorch_step_ms']:>17.1f}{r['overhead_ms']:>13.1f}{r['packed_round_ms']:>17.1f}"
                  f"{r['packed_overhead_ms']:>17.1f}")
    print(f"sim_samples_per_s={sim:.1f} ref_samples_per_s={ref:.1f} ratio={sim / ref:.3f} "
          f"end_to_end_ratio={e2e / ref_e2e:.3f} end_to_end_vs_steady_ref={e2e / ref:.3f} "
          f"measured_ratio={measured / ref:.3f} cold_end_to_end_ratio={cold_e2e / ref_e2e:.3f} "
          f"packed_ratio={packed / ref:.3f} packed_end_to_end_ratio={packed_e2e / ref_e2e:.3f}")


if __name__ == "__main__":
    main()
