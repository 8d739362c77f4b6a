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

Each round is computed centrally as the union batch of its clients. Without BatchNorm that is
exactly the federated step (the weighted mean of the clients' mean gradients, one server SGD
step; tested in ``tests/test_equivalence.py``), so the accuracy curves are the app's.

The virtual clock is a 64-device fleet (``FLEET``: four device kinds, their speed and link), the
round's B split over min(64, B) devices so that they finish together (``split_for_equal_finish``),
each device's step time ``IterTimeModel`` measured once on this machine (``--calibrate``, stored in
``<out>/time_to_accuracy_clock.json``), plus the fixed per-round latency of real SuperNodes
measured on the local rehearsal (``ROUND_LATENCY_S`` = 11.7 s, docs/deploy.md).

Protocol. Learning rates are chosen on the validation split with seed 0: ``small`` and ``large``
take the gap search's choice (a window of five or more values a factor 2 apart), the others
``--tune`` over three (``TUNE_LRS``). Seeds 1-5 then run at the chosen rate. The target is small
batch's mean final **validation** accuracy less 0.5 pp; a run reaches it at the first evaluation
(every ``EVAL_EPOCHS`` epochs) whose validation accuracy is at least that. Every finished run is
one JSON file in ``<out>/time_to_accuracy_runs/`` (written atomically), so an interrupted study
resumes; ``--report`` writes ``time_to_accuracy.csv``, ``time_to_accuracy_curves.csv`` and
``docs/time_to_accuracy.png``, and prints the table and the goal check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from estimators.performance import (
    IterTimeModel, comm_seconds, fit_iter_time, profile_batches, round_seconds, split_for_equal_finish,
)
from strategies.aggregation import weighted_mean
from strategies.batch_policy import noise_batch, noise_moments, noise_scale_of, scheduled_batch
from strategies.noise_scale import NoiseStats, noise_stats
from strategies.server_opt import ServerSGD, lr_at
from workloads.config import split_global_batch
from workloads.data import Splits, load_splits
from workloads.devices import DeviceProfile, parse_profiles
from workloads.files import atomic_write_json, atomic_write_text
from workloads.models import build_model
from workloads.registry import WORKLOADS
from workloads.training import batch_gradient, draw_batch, evaluate

DATASET, MODEL, TRAIN_LIMIT, EPOCHS = "cifar10", "cnn", 5000, 40
SMALL, LARGE, CLIENTS = 32, 512, 8  # CLIENTS: the clients whose spread measures B_simple (batch-noise)
WARMUP_FRAC, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
EVAL_EPOCHS = 2  # validation accuracy every this many epochs (and at the end)
ROUND_LATENCY_S = 11.7  # fixed seconds per round of real SuperNodes (docs/deploy.md, the local rehearsal)
FLEET = parse_profiles(",".join(16 * ["phone:0:0.25:20:60", "tablet:0:0.5:50:30", "laptop:0:1:100:20",
                                      "old-phone:0:0.15:10:80"]))
DEVICE_MAX_BATCH = 64  # per device; the fleet holds 64 x 64 = 4,096 examples a round, far above LARGE
# small and large: the gap search's validation choice (gap_search_runs.jsonl, seed 0)
CHOSEN_LR = {"small": 0.0125, "large": 0.05}
TUNE_LRS = (0.0125, 0.025, 0.05)
SEEDS = (1, 2, 3, 4, 5)
TARGET_MARGIN = 0.005  # the target is small batch's final validation accuracy less 0.5 pp


@dataclass(frozen=True)
class Method:
    """A batch method: the schedule of B_r and of the learning rate."""

    name: str
    schedule: str  # lr after warm-up: cosine or constant
    batch: int = 0  # fixed B; 0 = a schedule (steps, or the noise rule)
    steps: tuple[int, ...] = ()  # a step schedule: one B per equal share of the epochs
    settle: bool = False  # noise rule: B_simple measured during the lr warm-up is not used
    ratchet: bool = True  # noise rule: B never shrinks (False: B_r = the clamped EMA, up or down)
    moments: bool = False  # noise rule: tr(Sigma) and |mu|^2 averaged apart (the product's rule), else B_simple


STEP_BATCHES = (64, 128, 256, 512)  # batch-step: one per quarter of the epochs
METHODS = {m.name: m for m in (
    Method("small", "cosine", SMALL), Method("large", "cosine", LARGE),
    Method("batch-step", "constant", steps=STEP_BATCHES), Method("batch-step-cosine", "cosine", steps=STEP_BATCHES),
    Method("batch-noise", "constant"), Method("batch-step-128", "constant", steps=(128, 256, 512, 1024)),
    # 64 and 128 for 5 epochs each, then 256 and 512 for 15: the first jump at epoch 5 rather than 10
    Method("batch-step-fast", "constant", steps=(64, 128, 256, 256, 256, 512, 512, 512)),
    Method("batch-noise-warm", "constant", settle=True),
    Method("batch-noise-follow", "constant", settle=True, ratchet=False),
    Method("batch-noise-moments", "constant", settle=True, moments=True))}


def step_schedule(n: int, batches: tuple[int, ...] = STEP_BATCHES) -> tuple[list[tuple[int, float]], int]:
    """A step schedule's ``batch-steps`` as (rounds completed, multiplier of batches[0]) and its rounds."""
    steps, rounds = [], 0
    share = EPOCHS * n // len(batches)
    for b in batches:
        steps.append((rounds, b / batches[0]))
        rounds += math.ceil(share / b)
    return steps, rounds


def planned_rounds(method: Method, n: int) -> int:
    """Rounds of a method with a known schedule (for warm-up and cosine); batch-noise: small's."""
    if method.batch:
        return math.ceil(EPOCHS * n / method.batch)
    if method.steps:
        return step_schedule(n, method.steps)[1]
    return math.ceil(EPOCHS * n / SMALL)  # batch-noise: warm-up as small batch's (constant lr after it)


class FleetClock:
    """Virtual seconds of a round of B examples on ``FLEET``, from one measured step-time model."""

    def __init__(self, seconds_at: dict[int, float], model_bytes: float) -> None:
        self.seconds_at = seconds_at
        self.model: IterTimeModel = fit_iter_time(list(seconds_at), list(seconds_at.values()))
        self.comm = [comm_seconds(model_bytes, p) for p in FLEET]
        self._cache: dict[int, float] = {}

    def __call__(self, batch: int) -> float:
        """max_i (t(b_i) / speed_i + link_i) over the round's devices, plus the fixed round latency, s."""
        if batch not in self._cache:
            k = min(len(FLEET), batch)
            models = [_Scaled(self.model, p) for p in FLEET[:k]]
            split = split_for_equal_finish(batch, models, self.comm[:k], [DEVICE_MAX_BATCH] * k)
            compute = [m(b) for m, b in zip(models, split)]
            self._cache[batch] = round_seconds(compute, self.comm[:k], 0.0, ROUND_LATENCY_S)
        return self._cache[batch]


@dataclass(frozen=True)
class _Scaled:
    """A device's step time: this machine's model divided by the device's speed."""

    base: IterTimeModel
    profile: DeviceProfile

    def __call__(self, b: float) -> float:
        return float(self.base(b)) / self.profile.speed

    def inverse(self, t: float) -> float:
        return float(self.base.inverse(t * self.profile.speed))


def calibrate(splits: Splits, path: Path) -> dict[int, float]:
    """Median seconds of a gradient step at ``profile_batches(DEVICE_MAX_BATCH)`` on this machine (stored)."""
    if path.exists():
        return {int(k): v for k, v in json.loads(path.read_text())["seconds_at"].items()}
    w = WORKLOADS[DATASET]
    model, loss_fn = build_model(MODEL, w.input_shape, w.num_classes, 0), w.loss()
    out = {}
    for b in profile_batches(DEVICE_MAX_BATCH):
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            batch_gradient(model, loss_fn, splits.inputs, splits.x_train[:b], splits.y_train[:b])
            times.append(time.perf_counter() - t0)
        out[b] = float(np.median(times[2:]))
    atomic_write_json(path, {"seconds_at": out, "threads": torch.get_num_threads()})
    return out


def round_gradient(model, loss_fn, splits: Splits, pos: torch.Tensor, clients: int) -> tuple[list, float, NoiseStats]:
    """The union batch's mean gradient, its mean loss and its noise statistics (nan unless ``clients`` >= 2).

    With clients >= 2 the batch is split as the server would split it, each part's mean gradient
    computed, and their b_i-weighted mean taken: the federated step's own gradient.
    """
    params = list(model.parameters())
    if clients < 2:
        loss = batch_gradient(model, loss_fn, splits.inputs, splits.x_train[pos], splits.y_train[pos])
        return [p.grad.clone() for p in params], loss, NoiseStats(math.nan, math.nan, math.nan)
    sizes, parts, losses, start = split_global_batch(len(pos), clients), [], [], 0
    for b in sizes:
        idx = pos[start:start + b]
        start += b
        losses.append(batch_gradient(model, loss_fn, splits.inputs, splits.x_train[idx], splits.y_train[idx]))
        parts.append([p.grad.clone() for p in params])
    total = float(sum(sizes))
    grad = weighted_mean(parts, sizes)
    return grad, float(np.dot(sizes, losses) / total), noise_stats(grad, parts, sizes)


def ratio_ema(previous: float | None, b_simple: float, decay: float = 0.9) -> float | None:
    """The noise rule's average before it averaged tr(Sigma) and |mu|^2 apart (batch-noise, -warm, -follow):
    the EMA of each round's B_simple; a non-finite or non-positive one is skipped."""
    if not (math.isfinite(b_simple) and b_simple > 0):
        return previous
    return b_simple if previous is None else decay * previous + (1.0 - decay) * b_simple


def train(method: Method, lr: float, seed: int, splits: Splits, clock: FleetClock) -> dict:
    """One run to ``EPOCHS`` epochs; its record with the validation curve (module docstring)."""
    t0, w = time.perf_counter(), WORKLOADS[DATASET]
    model, loss_fn = build_model(MODEL, w.input_shape, w.num_classes, seed), w.loss()
    params, opt = list(model.parameters()), ServerSGD(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    n = len(splits.y_train)
    total, rounds_planned = EPOCHS * n, planned_rounds(method, n)
    warmup = max(1, round(WARMUP_FRAC * rounds_planned))
    steps = step_schedule(n, method.steps)[0] if method.steps else []
    seen = rnd = epoch = cursor = 0
    virtual, ema, moments, batch, next_eval = 0.0, None, None, 0, EVAL_EPOCHS * n
    curve, batches = [], []
    while seen < total:
        rnd += 1
        if method.batch:
            batch = method.batch
        elif method.steps:
            batch = scheduled_batch(method.steps[0], steps, rnd)
        else:
            batch = noise_batch(batch if method.ratchet else 0, ema, SMALL, LARGE)
        pos, epoch, cursor = draw_batch(n, batch, seed, epoch, cursor)
        clients = 1 if method.batch or method.steps else CLIENTS  # the noise rule measures B_simple
        grad, loss, stats = round_gradient(model, loss_fn, splits, pos, clients)
        if not math.isfinite(loss) or loss > 1e3:
            return _record(method, lr, seed, rnd, seen, virtual, curve, batches, t0, diverged=True)
        if not (method.settle and rnd <= warmup):
            if method.moments:  # the product's PolicyMemory.observe: keep E while the averaged |mu|^2 <= 0
                moments = noise_moments(moments, stats.tr_sigma, stats.grad_sq, 0.9)
                scale = noise_scale_of(moments)
                ema = ema if scale is None else scale
            else:
                ema = ratio_ema(ema, stats.b_simple)
        opt.step(params, grad, lr_at(rnd, rounds_planned, lr, warmup, method.schedule))
        seen, virtual = seen + batch, virtual + clock(batch)
        batches.append(batch)
        if seen >= next_eval or seen >= total:
            next_eval += EVAL_EPOCHS * n
            _, val = evaluate(model, loss_fn, splits.inputs, splits.x_val, splits.y_val, 500)
            curve.append({"round": rnd, "samples_seen": seen, "virtual_total_s": virtual, "val_accuracy": val,
                          "global_batch": batch, "b_simple_ema": ema if ema is not None else math.nan})
    _, test = evaluate(model, loss_fn, splits.inputs, splits.x_test, splits.y_test, 500)
    return _record(method, lr, seed, rnd, seen, virtual, curve, batches, t0, test=test)


def _record(method: Method, lr: float, seed: int, rnd: int, seen: int, virtual: float, curve: list, batches: list,
            t0: float, test: float = 0.1, diverged: bool = False) -> dict:
    """The JSON record of one run."""
    return {"method": method.name, "lr": lr, "seed": seed, "rounds": rnd, "samples_seen": seen,
            "epochs": seen / TRAIN_LIMIT, "virtual_s": virtual, "final_test_accuracy": test,
            "final_val_accuracy": curve[-1]["val_accuracy"] if curve and not diverged else 0.1,
            "diverged": diverged, "curve": curve, "mean_batch": float(np.mean(batches)) if batches else 0.0,
            "wall_s": time.perf_counter() - t0}


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


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: seeds, test accuracy mean and std (pp), runs reaching the target, mean rounds and hours to it."""
    small = df[df.method == "small"]
    ref_rounds, ref_s = small.rounds_to_target.mean(), small.virtual_s_to_target.mean()
    ref_acc = small.final_test_accuracy.mean()
    out = []
    for method, d in df.groupby("method", sort=False):
        out.append({"method": method, "seeds": len(d), "lr": d.lr.iloc[0],
                    "test_pct": 100 * d.final_test_accuracy.mean(), "std_pp": 100 * d.final_test_accuracy.std(ddof=1),
                    "vs_small_pp": 100 * (d.final_test_accuracy.mean() - ref_acc),
                    "reached": int(d.rounds_to_target.notna().sum()), "rounds": d.rounds.mean(),
                    "rounds_to_target": d.rounds_to_target.mean(), "hours_to_target": d.virtual_s_to_target.mean() / 3600,
                    "round_ratio": d.rounds_to_target.mean() / ref_rounds, "time_ratio": d.virtual_s_to_target.mean() / ref_s})
    return pd.DataFrame(out)


def goal_lines(s: pd.DataFrame) -> list[str]:
    """The goal, method by method: every run reaches the target, ratios <= 1/4, within 0.5 pp at equal epochs."""
    lines = []
    for r in s[s.method != "small"].itertuples():
        ok = r.reached == r.seeds and r.round_ratio <= 0.25 and r.time_ratio <= 0.25 and r.vs_small_pp >= -0.5
        lines.append(f"{r.method}: reached {r.reached}/{r.seeds}, rounds x{r.round_ratio:.3f}, time x{r.time_ratio:.3f} "
                     f"of small, final {r.vs_small_pp:+.2f} pp -> goal {'REACHED' if ok else 'not reached'}")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(out: Path, plot_path: Path) -> pd.DataFrame:
    """Write the CSVs and the plot from the finished runs; print the table and the goal check."""
    df, curves, target = results(load_runs(out))
    atomic_write_text(out / "time_to_accuracy.csv", df.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "time_to_accuracy_curves.csv", curves.to_csv(index=False, float_format="%.6g"))
    s = summary(df)
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
