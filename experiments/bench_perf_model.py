"""Benchmark the parallel performance model against measured iteration and round times.

``python -m experiments.bench_perf_model [--quick] [--data-dir DIR] [--threads 1] [--device cpu|cuda]``

1. **Iteration time.** For each model, time the client's step (``batch_gradient``: forward,
   backward, gradients accumulated) at batch sizes 1, 2, 4, ... up to a maximum, fit the model
   from 4 of them (geometric from 1 to the maximum: 1, 8, 64, 512) and predict all. Reported per model: the mean
   absolute percentage error (MAPE) of our knee model and of the linear Pollux/FedScale model
   fitted to the same 4 points.
2. **Round time.** A real in-process simulation (flb/inprocess.py) of the CPU CNN on
   CIFAR-10 (digits with ``--quick``) with heterogeneous device profiles: per round, the
   predicted synchronous round time (each client's fitted step time at its ``b_i`` / speed +
   its link, the slowest client, plus the server's measured aggregation time) against the
   round's ``virtual_s``, computed from the clients' *measured* compute seconds.

The last line is ``mape=<x> round_err=<y>`` (fractions; round_err is the median relative error
over rounds 2..R). Timings are medians of repeated steps after a warm-up; other load on the
machine inflates them, so run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from estimators.performance import client_virtual_seconds, fit_iter_time, fit_linear, profile_batches
from workloads.devices import parse_profiles, profile_for
from workloads.models import build_model
from workloads.registry import WORKLOADS
from workloads.training import step_seconds

CASES = [  # (label, dataset, model, largest batch)
    ("mlp/digits", "digits", "mlp", 1024),
    ("cnn/mnist", "mnist", "cnn", 512),
    ("cnn/cifar10", "cifar10", "cnn", 512),
    ("resnet18/cifar10", "cifar10", "resnet18", 128),
]
PROFILES = "fast:0:1.0:1000:5,mid:0:0.5:100:20,slow:0:0.25:20:50"


def time_step(model: torch.nn.Module, input_shape: tuple[int, ...], batch: int, min_total_s: float = 0.3) -> float:
    """Median wall seconds of one client step at ``batch`` on random float inputs (on the model's device)."""
    device = next(model.parameters()).device
    x, y = torch.randn(batch, *input_shape, device=device), torch.randint(0, 10, (batch,), device=device)
    return step_seconds(model, torch.nn.CrossEntropyLoss(reduction="sum"), lambda t: t, x, y, min_total_s=min_total_s)


def iteration_benchmark(cases, device: str = "cpu", scale: int = 1) -> list[dict]:
    """Measure, fit and predict step times; one row per model and batch."""
    rows = []
    for label, dataset, model_name, largest in cases:
        w = WORKLOADS[dataset]
        model = build_model(model_name, w.input_shape, w.num_classes, seed=0).to(device)
        largest *= scale
        prof = profile_batches(largest)
        sizes = sorted({int(b) for b in 2 ** np.arange(0, int(np.log2(largest)) + 1)} | set(prof))
        measured = {b: time_step(model, w.input_shape, b) for b in sizes}
        ours = fit_iter_time(prof, [measured[b] for b in prof])
        linear = fit_linear(prof, [measured[b] for b in prof])
        for b in sizes:
            rows.append({"model": label, "batch": b, "measured_s": measured[b], "pred_s": ours(b),
                         "linear_s": linear(b), "profiled": b in prof})
    return rows


def round_benchmark(dataset: str, model_name: str, data_dir: str, rounds: int) -> list[dict]:
    """Predicted vs measured virtual round time in an in-process simulation."""
    from flb.inprocess import run_inprocess
    import pandas as pd

    w = WORKLOADS[dataset]
    model = build_model(model_name, w.input_shape, w.num_classes, seed=0)
    batches = (8, 16, 32, 64, 128)
    prof = profile_batches(256)
    fit = fit_iter_time(prof, [time_step(model, w.input_shape, b) for b in prof])
    model_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    profiles = parse_profiles(PROFILES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for B in batches:
            out = Path(tmp) / f"B{B}"
            run_inprocess({"dataset": dataset, "model": model_name, "data-dir": data_dir, "global-batch-size": 6 * B,
                           "num-server-rounds": rounds, "eval-every": rounds, "device-profiles": PROFILES,
                           "out-dir": str(out)}, num_clients=6)
            r = pd.read_csv(out / "rounds.csv").set_index("round")
            c = pd.read_csv(out / "clients.csv")
            for rnd, g in c[c["round"] > 1].groupby("round"):
                pred = max(client_virtual_seconds(fit(b), profile_for(profiles, p), model_bytes)
                           for b, p in zip(g.local_batch, g.partition_id)) + r.loc[rnd, "server_s"]
                rows.append({"local_batch": B, "round": rnd, "pred_s": pred, "measured_s": r.loc[rnd, "virtual_s"]})
    return rows


def main() -> None:
    """Print both comparisons and the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small models, digits rounds (< 60 s)")
    parser.add_argument("--data-dir", default=os.environ.get("FLB_DATA_DIR", ""))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: as a simulated client, a Ray actor with client-resources-num-cpus=1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the iteration benchmark runs; on cuda the "
                        "largest batches are 8x larger and the round benchmark (CPU simulation) is skipped")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cases = CASES[:2] if args.quick else CASES
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r}: CUDA is not available here; allowed: cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}")
    rows = iteration_benchmark(cases, args.device, 8 if cuda else 1)
    print(f"{'model':<18}{'batch':>6}{'measured ms':>13}{'ours ms':>10}{'err':>8}{'linear ms':>11}{'err':>8}")
    for r in rows:
        print(f"{r['model']:<18}{r['batch']:>6}{1e3 * r['measured_s']:>13.2f}{1e3 * r['pred_s']:>10.2f}"
              f"{r['pred_s'] / r['measured_s'] - 1:>+8.1%}{1e3 * r['linear_s']:>11.2f}{r['linear_s'] / r['measured_s'] - 1:>+8.1%}"
              f"{'  (profiled)' if r['profiled'] else ''}")
    held_out = [r for r in rows if not r["profiled"]]
    mape = float(np.mean([abs(r["pred_s"] / r["measured_s"] - 1) for r in held_out]))
    mape_lin = float(np.mean([abs(r["linear_s"] / r["measured_s"] - 1) for r in held_out]))
    for label in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in held_out if r["model"] == label]
        print(f"  {label:<18} MAPE ours {np.mean([abs(r['pred_s'] / r['measured_s'] - 1) for r in sub]):.3f}  "
              f"linear {np.mean([abs(r['linear_s'] / r['measured_s'] - 1) for r in sub]):.3f}")
    print(f"iteration time, batches not profiled: MAPE ours {mape:.3f}, linear (Pollux/FedScale) {mape_lin:.3f}")

    if cuda:
        print(f"wall {time.perf_counter() - t0:.0f} s")
        print(f"mape={mape:.4f} round_err=nan")
        return
    dataset, model_name = ("digits", "mlp") if args.quick else ("cifar10", "cnn")
    rounds = round_benchmark(dataset, model_name, args.data_dir, 3 if args.quick else args.rounds)
    print(f"\nround time, {dataset}/{model_name}, 6 clients on profiles {PROFILES}")
    print(f"{'b_i':>6}{'rounds':>8}{'measured s':>12}{'predicted s':>13}{'median err':>12}")
    for B in dict.fromkeys(r["local_batch"] for r in rounds):
        sub = [r for r in rounds if r["local_batch"] == B]
        errs = [abs(r["pred_s"] / r["measured_s"] - 1) for r in sub]
        print(f"{B:>6}{len(sub):>8}{np.median([r['measured_s'] for r in sub]):>12.4f}"
              f"{np.median([r['pred_s'] for r in sub]):>13.4f}{np.median(errs):>12.3f}")
    round_err = float(np.median([abs(r["pred_s"] / r["measured_s"] - 1) for r in rounds]))
    print(f"wall {time.perf_counter() - t0:.0f} s")
    print(f"mape={mape:.4f} round_err={round_err:.4f}")


if __name__ == "__main__":
    main()
