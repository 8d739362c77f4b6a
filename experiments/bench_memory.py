"""Benchmark of the memory estimator: predicted vs measured peak bytes of a training step, in both gradient modes.

Run ``python -m experiments.bench_memory [--quick] [--threads N]``. For each model, optimizer,
gradient mode and batch size it prints the estimator's prediction (estimators/memory.py, traced
at batch sizes 3, 6, 12 and 24, never at a benchmarked size) and the ground truth (a real
second training step at that size in the same mode, peak of live allocator bytes,
estimators/memory_trace.py). The modes (column ``set_to_none``): True is PyTorch's default loop
(``optimizer.zero_grad()`` frees the gradients), False the flower-large-batch client step
(gradients kept, zeroed in place). Then the probe comparison (PyTorch Lightning's
``BatchSizeFinder`` in ``binsearch`` mode, emulated, in PyTorch's default mode, which
Lightning's loop uses: a trial whose measured peak exceeds the budget counts as an
out-of-memory error), and last one line per mode,
``set_to_none=<mode> median_err=<x> p95_err=<y> max_under=<z> cases=<n>`` (relative errors as
fractions; an under-estimate is measured > predicted). The table goes to
experiments/results/bench_memory.csv.
The full run also checks the ground truth against the process's resident set (VmHWM) on two
cases, in subprocesses, with glibc's default malloc and with a fixed mmap threshold.

Threads default to 1: the kernel PyTorch picks depends on the thread count (and so does the
memory), estimator and ground truth run with the same setting, and on a shared 2-core machine
two OpenMP threads slow steps down by an order of magnitude.
"""

from __future__ import annotations

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # before torch loads Kineto: no per-session log lines

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from estimators.memory import MemoryEstimator, measure_peak_bytes
from experiments.memory_models import NUM_CLASSES, BenchModel, bench_models
from workloads.devices import MIB
from workloads.files import atomic_write_text

CSV_PATH = Path(__file__).resolve().parent / "results" / "bench_memory.csv"

MODES = (True, False)  # set_to_none: PyTorch's default loop, then the clients' step


def run_cases(models: list[BenchModel], optimizers: tuple[str, ...], device: str = "cpu",
              modes: tuple[bool, ...] = MODES) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predict and measure every case in every gradient mode; print each row as it is done. Returns (cases, timings)."""
    rows, timings = [], []
    print(f"{'model':<20} {'opt':<5} {'set_to_none':>11} {'batch':>5} {'micro':>5} {'predicted_MiB':>14} "
          f"{'measured_MiB':>13} {'rel_err':>9}")
    for spec in models:
        model = spec.build()
        params = sum(p.numel() for p in model.parameters())
        for optimizer in optimizers:
            for set_to_none in modes:
                est = MemoryEstimator(model, spec.input_shape, NUM_CLASSES, optimizer, input_dtype=spec.input_dtype,
                                      device=device, set_to_none=set_to_none)
                knots, same = est.step_model.knots, est.step_model.same_ops
                switches = ",".join(f"{a}-{b}" for a, b, ok in zip(knots, knots[1:], same) if not ok) or "-"
                timing = dict(model=spec.name, optimizer=optimizer, set_to_none=set_to_none, params=params,
                              state_MiB=est.state_bytes / MIB, estimate_s=est.estimate_seconds, kernel_switch_in=switches)
                cases = [(b, None) for b in spec.batch_sizes] + list(spec.micro)
                for batch, micro in cases:
                    start = time.perf_counter()
                    measured = measure_peak_bytes(model, spec.input_shape, NUM_CLASSES, optimizer, batch, device=device,
                                                  micro_batch_size=micro, input_dtype=spec.input_dtype,
                                                  set_to_none=set_to_none)
                    measure_s = time.perf_counter() - start
                    est.refine_to(micro or batch)  # CUDA: knots up to >= b/2 (never at b); no-op on the CPU
                    predicted = est.peak_bytes(batch, micro)
                    signed = (predicted - measured) / measured
                    rows.append(dict(device=device, model=spec.name, optimizer=optimizer, set_to_none=set_to_none,
                                     batch=batch, micro_batch=micro or batch, predicted_bytes=predicted,
                                     measured_bytes=measured, rel_err=abs(signed), signed_err=signed,
                                     estimate_s=est.estimate_seconds, measure_s=measure_s))
                    print(f"{spec.name:<20} {optimizer:<5} {set_to_none!s:>11} {batch:>5} {micro or batch:>5} "
                          f"{predicted / MIB:>14.3f} {measured / MIB:>13.3f} {signed:>+9.5f}", flush=True)
                timings.append(timing | dict(with_micro_s=est.estimate_seconds))  # + later passes, if a case micro-batches
    return pd.DataFrame(rows), pd.DataFrame(timings)


def capped_check(models: list[BenchModel], cases: pd.DataFrame, device: str, slack: float = 0.02) -> pd.DataFrame:
    """Re-run every under-estimated CUDA case with the caching allocator capped at the prediction.

    cuDNN takes workspaces opportunistically: PyTorch tries the heuristics' algorithms in
    order and falls back to one with a smaller workspace when the allocation fails, so the
    uncapped ``max_memory_allocated`` can exceed what the step needs. The cap
    (``set_per_process_memory_fraction``, on reserved bytes, so fragmentation counts too) is
    ``predicted * (1 + slack)``; the row says whether the real step completed under it.
    """
    specs = {m.name: m for m in models}
    index = torch.device(device).index or 0  # set_per_process_memory_fraction needs an index
    total = torch.cuda.get_device_properties(index).total_memory
    rows = []
    for case in cases[cases["signed_err"] < -slack].itertuples():
        spec = specs[case.model]
        cap = case.predicted_bytes * (1 + slack)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
        try:
            peak = measure_peak_bytes(spec.build(), spec.input_shape, NUM_CLASSES, case.optimizer, case.batch, device,
                                      micro_batch_size=case.micro_batch, input_dtype=spec.input_dtype,
                                      set_to_none=bool(case.set_to_none))
            ok = True
        except torch.cuda.OutOfMemoryError:
            peak, ok = float("nan"), False
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
            torch.cuda.empty_cache()
        rows.append(dict(model=case.model, optimizer=case.optimizer, set_to_none=case.set_to_none, batch=case.batch,
                         micro_batch=case.micro_batch, predicted_MiB=case.predicted_bytes / MIB, uncapped_MiB=case.measured_bytes / MIB,
                         cap_MiB=cap / MIB, completed_under_cap=ok, capped_peak_MiB=peak / MIB))
    return pd.DataFrame(rows)


def lightning_binsearch(fits: Callable[[int], bool], init_val: int = 2, max_trials: int = 25) -> tuple[int, int]:
    """Lightning's ``BatchSizeFinder(mode="binsearch")`` search: double until OOM, then bisect.

    ``fits(b)`` runs a trial at batch ``b`` and returns False for an out-of-memory error.
    Returns (largest batch that ran, trials run). Lightning's optional ``margin`` is not applied.
    """
    low, high, size, trials = 0, None, init_val, 0
    while trials < max_trials:
        trials += 1
        if fits(size):
            low = size
            size = size * 2 if high is None else (low + high) // 2
        else:
            high = size
            size = (low + high) // 2
        if high is not None and high - low <= 1:
            break
    return low, trials


def probe_comparison(models: list[BenchModel], budgets: dict[str, int], optimizer: str, device: str = "cpu",
                     set_to_none: bool = True) -> list[dict]:
    """The estimator's ``max_batch_size`` vs the emulated probe, in result and wall time, in one gradient mode."""
    results = []
    for spec in models:
        if spec.name not in budgets:
            continue
        budget, model = budgets[spec.name], spec.build()
        peaks: dict[int, int] = {}

        def fits(b: int) -> bool:  # one trial = a warm-up and a measured real step at batch b
            peaks[b] = measure_peak_bytes(model, spec.input_shape, NUM_CLASSES, optimizer, b, device,
                                          input_dtype=spec.input_dtype, set_to_none=set_to_none)
            return peaks[b] <= budget

        start = time.perf_counter()
        probe_b, trials = lightning_binsearch(fits)
        probe_s = time.perf_counter() - start
        start = time.perf_counter()
        est = MemoryEstimator(model, spec.input_shape, NUM_CLASSES, optimizer, input_dtype=spec.input_dtype, device=device,
                              set_to_none=set_to_none)
        est_b = est.max_batch_size(budget)
        est_s = time.perf_counter() - start
        check = peaks.get(est_b) or measure_peak_bytes(model, spec.input_shape, NUM_CLASSES, optimizer, est_b, device,
                                                       input_dtype=spec.input_dtype, set_to_none=set_to_none)
        results.append(dict(model=spec.name, optimizer=optimizer, set_to_none=set_to_none, budget_MiB=budget / MIB, probe_batch=probe_b,
                            probe_trials=trials, probe_examples=sum(peaks), probe_s=probe_s, estimator_batch=est_b,
                            estimator_s=est_s, measured_MiB_at_estimator_batch=check / MIB))
    return results


def _rss_case(name: str, optimizer: str, batch: int) -> dict:
    """In this process: the profiler's transient (peak - live at step start) and the growth of
    the resident set's high-water mark (VmHWM, reset via /proc/self/clear_refs) over a real
    second step of the clients' mode (gradients kept), both in bytes."""
    import copy
    import ctypes
    import gc

    from estimators.memory_trace import make_optimizer, trace_steps, training_step

    def status(key: str) -> int:  # /proc/self/status values are in kB
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    spec = next(m for m in bench_models(quick=False) if m.name == name)
    model = spec.build()
    make = lambda b: torch.randn((b, *spec.input_shape))  # noqa: E731  (image models only)
    (trace,) = trace_steps(model, optimizer, make, NUM_CLASSES, [batch], set_to_none=False)
    clone, x, y = copy.deepcopy(model), make(batch), torch.arange(batch) % NUM_CLASSES
    opt = make_optimizer(clone.parameters(), optimizer)
    training_step(clone, opt, x, y, set_to_none=False)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand free heap pages back first
    rss_before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    training_step(clone, opt, x, y, set_to_none=False)
    return dict(profiler_transient=trace.peak_bytes - trace.live_before, rss_growth=status("VmHWM:") - rss_before)


def rss_cross_check(cases: list[tuple[str, str, int]]) -> list[dict]:
    """Does the profiler see all the memory a step needs? Compare with the resident set.

    Each case runs in a fresh process, once with glibc's defaults and once with a fixed mmap
    threshold (``MALLOC_MMAP_THRESHOLD_=131072``, ``MALLOC_TRIM_THRESHOLD_=0``: large blocks
    are mapped on allocation and unmapped on free, so RSS follows the live bytes).
    """
    import json
    import subprocess

    rows = []
    for name, optimizer, batch in cases:
        for label, extra in (("glibc default", {}), ("mmap threshold 128 KiB", {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"})):
            cmd = [sys.executable, "-m", "experiments.bench_memory", "--rss-case", f"{name},{optimizer},{batch}",
                   "--threads", str(torch.get_num_threads())]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **extra}, check=False)
            try:
                got = json.loads(out.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                rows.append(dict(model=name, optimizer=optimizer, batch=batch, malloc=label, error=out.stderr[-200:]))
                continue
            rows.append(dict(model=name, optimizer=optimizer, batch=batch, malloc=label,
                             profiler_transient_MiB=got["profiler_transient"] / MIB, rss_hwm_growth_MiB=got["rss_growth"] / MIB,
                             ratio=got["rss_growth"] / got["profiler_transient"]))
    return rows


def summary_line(signed_err: np.ndarray) -> str:
    """``median_err=<x> p95_err=<y> max_under=<z>`` from signed relative errors (pred-meas)/meas."""
    abs_err = np.abs(signed_err)
    max_under = float(max(0.0, -signed_err.min()))
    return f"median_err={np.median(abs_err):.5f} p95_err={np.percentile(abs_err, 95):.5f} max_under={max_under:.5f}"


def mode_summary(cases: pd.DataFrame) -> list[str]:
    """One ``set_to_none=<mode> <summary_line> cases=<n>`` line per gradient mode."""
    return [f"set_to_none={mode} {summary_line(group['signed_err'].to_numpy())} cases={len(group)}"
            for mode, group in cases.groupby("set_to_none", sort=False)]


def kept_fit_on_freed_step(cases: pd.DataFrame) -> str:
    """How far the clients' estimate (gradients kept) lies from a step that frees them, per case.

    The error a user of PyTorch's default loop got before the estimator had the mode:
    (predicted with set_to_none=False - measured with True) / measured, over the cases run in both.
    """
    key = ["model", "optimizer", "batch", "micro_batch"]
    both = cases[cases["set_to_none"]].merge(cases[~cases["set_to_none"]], on=key, suffixes=("_freed", "_kept"))
    if both.empty:
        return "(no case run in both modes)"
    err = (both["predicted_bytes_kept"] - both["measured_bytes_freed"]) / both["measured_bytes_freed"]
    save = (both["measured_bytes_kept"] - both["measured_bytes_freed"]) / both["measured_bytes_kept"]
    return (f"clients' estimate (set_to_none=False) against PyTorch's default step (True): median {err.median():+.5f}, "
            f"p95 {err.quantile(0.95):+.5f}, max {err.max():+.5f} over {len(both)} cases; freeing gradients lowers the "
            f"measured peak by median {save.median():.5f}, max {save.max():.5f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="four small models, four batch sizes (< 60 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for estimator and ground truth")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]; on CUDA the ground truth is torch.cuda.max_memory_allocated")
    parser.add_argument("--csv", type=Path, default=None, help="default: experiments/results/bench_memory[_cuda][_quick].csv")
    parser.add_argument("--rss-case", help=argparse.SUPPRESS)  # internal: MODEL,OPT,BATCH -> one JSON line
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_case:
        import json

        name, optimizer, batch = args.rss_case.split(",")
        print(json.dumps(_rss_case(name, optimizer, int(batch))))
        return
    wall = time.perf_counter()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r}: CUDA is not available here; allowed: cpu")
    truth = ("torch.cuda.max_memory_allocated of a real second step" if cuda else
             "peak live bytes of a real second step (profiler allocator events, model state included)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}; ground truth: {truth}")
    models = bench_models(args.quick)
    if cuda and not args.quick:  # a GPU holds far larger batches: add 512 to every model's sizes
        models = [replace(m, batch_sizes=m.batch_sizes + (512,)) for m in models]
    cases, timings = run_cases(models, ("sgd", "adam"), args.device)

    print("\nper-model estimation time (estimate_s: trace at b = 3, 6, 12, 24 and fit; with_micro_s: after all cases, "
          "with set_to_none including the gradients-kept ladder a micro-batched case traces):")
    print(timings.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    worst = cases.groupby(["model", "set_to_none"]).agg(max_abs_err=("rel_err", "max"), worst_signed=("signed_err", "min"),
                                                        cases=("rel_err", "size"))
    print("\nper-model error (max |rel err|, most negative signed err):")
    print(worst.to_string(float_format=lambda v: f"{v:+.5f}"))
    print("\n" + kept_fit_on_freed_step(cases))

    budgets = {"cnn-cifar10": 64 * MIB} if args.quick else {"cnn-cifar10": 256 * MIB, "resnet18": 1024 * MIB}
    probe = probe_comparison(models, budgets, "sgd", args.device, set_to_none=True)
    print("\nprobe (Lightning binsearch, emulated: trial peak > budget = OOM; PyTorch's default loop, gradients "
          "freed) vs estimator.max_batch_size:")
    print(pd.DataFrame(probe).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("(a probe trial = fresh copy + warm-up step + measured step, from init_val=2; Lightning runs "
          "steps_per_trial=3. An emulated OOM trial runs to completion; a real one stops at the failing allocation.)")

    if not args.quick and not cuda:
        print("\nground-truth coverage: profiler transient vs resident-set high-water growth over the step (gradients kept):")
        rss = rss_cross_check([("cnn-cifar10", "sgd", 128), ("resnet18", "sgd", 64)])
        print(pd.DataFrame(rss).to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    csv = args.csv or CSV_PATH.with_name(f"bench_memory{'_cuda' if cuda else ''}{'_quick' if args.quick else ''}.csv")
    if cuda:
        capped = capped_check(models, cases, args.device)
        print(f"\nunder-estimates beyond 0.02 re-run with the allocator capped at predicted x 1.02 ({len(capped)} cases):")
        print(capped.to_string(index=False, float_format=lambda v: f"{v:.1f}") if len(capped) else "(none)")
        if len(capped):
            print(f"completed under the cap: {int(capped['completed_under_cap'].sum())}/{len(capped)}")
    atomic_write_text(csv, cases.to_csv(index=False))
    print(f"\n{len(cases)} cases written to {csv}; wall time {time.perf_counter() - wall:.1f} s")
    sys.stdout.flush()
    print("\n".join(mode_summary(cases)))


if __name__ == "__main__":
    main()
