"""A benchmark with a real large-batch generalisation gap, and the teachers on it.

``python -m experiments.generalization_gap [--data-dir DIR] [--quick] [--methods small,large,...]``
``python -m experiments.generalization_gap --report --markdown`` (train nothing: the runs finished so far)

The setting (found by ``experiments/gap_search.py`` in plain PyTorch): CIFAR-10, model ``cnn``
(no normalisation layers, 0.62 M parameters), a fixed subset of 5,000 training images, 40
epochs, no augmentation, SGD momentum 0.9, weight decay 5e-4, linear warm-up over 5% of the
steps then cosine decay. Small batch B = 32 (6,250 steps) against large batch B = 512 (16x,
391 steps). Every run goes through the real ServerApp and ClientApp in this process
(``flb.run``) with 8 IID clients: a small-batch round is 8 clients x 4 examples, a large one
8 x 64.

Methods (each a row of ``METHODS``): ``small`` and ``large`` (no teacher); the teachers
``step``, ``noise``, ``adascale``, ``linear`` (Goyal), ``post-local`` (Lin et al. 2020),
``swap`` (Gupta et al. 2020), ``signed-noise`` (small-batch noise that survives secure
aggregation) and ``learned`` (per-tensor gains fitted on the validation split). ``sqrt`` and
``lars`` of the earlier paper-claim study (docs/teachers.md) are left out: at a fixed B sqrt is
plain large batch with a reparametrised learning rate (it tied ``large`` exactly there), and
LARS was no better than plain large batch there either; the CPU hours go to the new teachers. ``linear`` and ``noise``
are not run by default either (``SKIPPED``); ``--methods`` runs any of them.

Protocol (the same for every method):

1. Budgets. **Equal epochs**: every method sees 40 epochs of examples; the large-batch
   methods take 391 sequential steps (16x fewer than small batch's 6,250). **Equal
   iterations**: the small batch takes the large batch's 391 steps (16x fewer examples); the
   large-batch runs are those of the first budget. ``steps`` counts sequential optimizer steps
   (local steps of post-local and SWAP included: they run on every client in parallel, one after
   another in time), ``rounds`` communication rounds.
2. Tuning. Every method gets the same number of learning-rates, ``--grid-size`` (3) values a
   factor 2 apart, placed from the gap search and the method's meaning of ``lr``; each is run with
   seed 0 and scored on the **validation** split. If the best is at an edge of the window, the
   window slides one step past that edge (one more run, at most once; ``slid`` in the tuning
   table says so). The test split is never looked at to choose anything.
   Small batch at equal epochs comes from the plain-PyTorch gap search by default
   (``--small-source torch``, ``small_reference``): the identical step, 5x cheaper.
3. Evaluation. Seeds 1, 2, 3 (fresh: data order, sampling, initialisation, noise) at the chosen
   learning rate; test accuracy as mean +- std over seeds.
4. Overhead. ``teacher_time_s`` (the teacher's call, per round) against the median round time.

Every run's folder lives under ``<out>/runs/generalization_gap/`` (gitignored), named by the
method and a digest of its settings; flb reads a finished run back instead of training it, so
an interrupted benchmark resumes where it stopped (a run cut short continues from its last
checkpoint, every 100 rounds).

Outputs in ``--out`` (``experiments/results``): ``generalization_gap.csv`` (one row per budget,
method and seed), ``generalization_gap_tuning.csv``, ``generalization_gap_learned.csv`` (the
learned teacher's gains per round, mean over seeds), ``generalization_gap.png``, and a printed
summary with the goal check. ``--quick`` is a tiny configuration for the test suite (digits, a
few hundred examples, one seed, one learning rate, no tuning runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import flb
from experiments.gap_report import goal_check, learned_gains, markdown, plot, summarise
from workloads.files import atomic_write_text

CLIENTS = 8
SEEDS = (1, 2, 3)
TUNE_SEED = 0


@dataclass(frozen=True)
class Method:
    """One method of the benchmark: its batch, teacher, learning-rate window and extra keys.

    ``low`` is the lowest learning rate of the window; the window is ``low * 2**i``. What ``lr``
    means depends on the teacher: the step's rate for small/large/step/noise/signed-noise/
    learned/post-local/swap, the small-batch base rate for linear (x16) and adascale (x r).
    """

    name: str
    large: bool  # True: B = ratio * small; False: B = small
    teacher: str
    low: float
    keys: dict[str, Any] = field(default_factory=dict)


# Windows placed from the gap search's validation grids (small: best 0.0125 of 0.00625..0.05;
# large: best 0.05 of 0.025..0.2, 0.2 stuck at 10%) and each method's meaning of lr.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("small", False, "none", 0.00625),
    Method("large", True, "none", 0.025),
    Method("step", True, "step", 0.0125),  # G x 4, 2, 1 over thirds: about 2x the plain rate on average
    Method("noise", True, "noise", 0.0125),  # extra variance: the best plain rate or below
    Method("adascale", True, "adascale", 0.003125),  # lr x gain r in [1, 16]
    Method("linear", True, "linear", 0.0015625),  # lr x 16: 0.025..0.2 effective, as large
    # phase 1 is plain large batch, whose validation grid through the apps chose 0.1 of 0.025..0.2
    Method("post-local", True, "post-local", 0.05),
    Method("swap", True, "swap", 0.05),
    Method("signed-noise", True, "signed-noise", 0.0125),  # as noise
    Method("learned", True, "learned", 0.025),  # noise with learned gains; signed-noise's grid chose 0.025 of 0.0125..0.05
)}
# Not run by default (CPU hours): at a fixed B, Goyal's linear rule is plain large batch with the
# learning rate reparametrised (tuned, it tied `large` exactly in the earlier paper-claim study), and
# `noise` adds the same small-batch noise as `signed-noise`, which also survives secure aggregation.
SKIPPED = ("linear", "noise")
POST_LOCAL_H = 16  # Lin et al. use H = 16 on CIFAR-10 (ResNet-20, 16 workers)
POST_LOCAL_SHARE = 0.5  # share of the steps after the switch; Lin et al. switch at the first decay, mid-training
SWAP_SHARE = 0.25  # share of the steps in SWAP's refinement (Gupta et al.: a short phase 2)
EQUAL_ITER_LOW = 0.0125  # small batch at 391 steps: under-trained, its best rate is higher


@dataclass(frozen=True)
class Setting:
    """The benchmark's fixed setting (the gap search's, or the tiny one of ``--quick``)."""

    dataset: str = "cifar10"
    model: str = "cnn"
    train_limit: int = 5000
    epochs: float = 40.0
    small: int = 32
    ratio: int = 16
    grid_size: int = 3
    seeds: tuple[int, ...] = SEEDS
    data_dir: str = ""

    @property
    def large(self) -> int:
        """The large global batch, examples."""
        return self.small * self.ratio

    def steps(self, batch: int) -> int:
        """Sequential steps of ``epochs`` epochs at global batch ``batch``."""
        return math.ceil(self.epochs * self.train_limit / batch)

    def base(self) -> dict[str, Any]:
        """Run-config keys shared by every run."""
        return {"dataset": self.dataset, "model": self.model, "data-dir": self.data_dir,
                "train-limit": self.train_limit, "augment": False, "partitioner": "iid", "schedule": "cosine",
                "momentum": 0.9, "weight-decay": 5e-4, "teacher-small-batch": self.small,
                "checkpoint-every": 100, "memory-check-every": -1}


def run_config(setting: Setting, method: Method, budget: str, lr: float, seed: int) -> dict[str, Any]:
    """The run config of one run (``steps`` sequential steps in ``rounds`` rounds)."""
    batch = setting.large if method.large else setting.small
    steps = setting.steps(setting.large if budget == "equal-iterations" else batch)
    rounds, keys = steps, dict(method.keys)
    if method.teacher == "post-local":  # phase 1: s rounds of one step; phase 2: L rounds of H local steps
        h = min(POST_LOCAL_H, max(2, steps // 4))
        local_rounds = max(1, round(POST_LOCAL_SHARE * steps / h))
        switch = steps - local_rounds * h
        rounds, keys = switch + local_rounds, keys | {"teacher-switch": switch, "teacher-local-steps": h}
    elif method.teacher == "swap":  # rounds - 1 large-batch steps, then one round of H steps on every client
        h = max(2, round(SWAP_SHARE * steps))
        rounds, keys = steps - h + 1, keys | {"teacher-local-steps": h}
    return setting.base() | keys | {
        "global-batch-size": batch, "teacher": method.teacher, "lr": lr, "seed": seed,
        "num-server-rounds": rounds, "eval-every": rounds, "warmup-rounds": max(1, round(0.05 * steps)),
    }


def _folder(root: Path, method: Method, config: dict[str, Any]) -> Path:
    """The run's folder: the method and a digest of its settings (not of where the data lives)."""
    settings = {k: v for k, v in config.items() if k != "data-dir"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return root / f"{method.name}-{digest}"


def final_train_loss(rounds: pd.DataFrame, epoch_examples: int) -> float:
    """Mean training loss over the last epoch's examples (rounds weighted by their examples)."""
    r = rounds[rounds["round"] > 0]
    seen = r["samples_seen"].to_numpy()
    examples = pd.Series(seen).diff().fillna(seen[0]).to_numpy()
    last = seen > seen[-1] - epoch_examples
    return float((r["train_loss"].to_numpy()[last] * examples[last]).sum() / examples[last].sum())


def small_reference(path: Path, setting: Setting) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Small batch at equal epochs from the plain-PyTorch gap search (``gap_search_runs.jsonl``).

    Without normalisation layers a FedSGD round is exactly one minibatch SGD step on the union
    batch (tests/test_equivalence.py), so the gap search's small-batch runs are this benchmark's
    small batch, five times cheaper than 6,250 rounds through the apps. The learning rate is
    chosen on validation with seed 0 (the search's window, wider than the teachers' grid: a
    stricter baseline); the evaluation seeds are the same as here. Returns (tuning, final) rows.
    """
    keep = lambda r: (r["dataset"] == setting.dataset and r["model"] == setting.model  # noqa: E731
                      and r["train_limit"] == setting.train_limit and r["epochs"] == setting.epochs
                      and r["batch"] == setting.small and not r["augment"])
    runs = [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if keep(r)]
    tune = [r for r in runs if r["seed"] == TUNE_SEED]
    if not tune:
        raise SystemExit(f"--small-source torch: no seed-{TUNE_SEED} run of batch {setting.small} in {path}")
    lr = max(tune, key=lambda r: r["val_acc"])["lr"]

    def record(r: dict[str, Any]) -> dict[str, Any]:
        return {"method": "small", "lr": r["lr"], "seed": r["seed"], "model": r["model"], "global_batch": r["batch"],
                "steps": r["steps"], "rounds": r["steps"], "samples": int(r["steps"] * r["batch"]),
                "val_accuracy": r["val_acc"], "test_accuracy": r["test_acc"],
                "final_train_loss": r["train_loss_last_epoch"], "round_s_median": r["wall_s"] / r["steps"],
                "teacher_s_median": 0.0, "wall_s": r["wall_s"], "cached": True, "error": "",
                "folder": str(path), "source": "torch"}

    final = [record(r) for r in runs if r["lr"] == lr and r["seed"] in setting.seeds]
    if len(final) < len(setting.seeds):
        raise SystemExit(f"--small-source torch: {path} has seeds {sorted(r['seed'] for r in final)} at lr {lr:g}, "
                         f"needs {list(setting.seeds)}; run experiments/gap_search.py or use --small-source app")
    tuning = [{"budget": "equal-epochs", **record(r), "chosen": r["lr"] == lr, "slid": ""} for r in tune]
    return tuning, [{"budget": "equal-epochs", **r} for r in final]


class Pending(Exception):
    """``--report``: a run the benchmark has not finished yet."""


class Bench:
    """Runs (or reads back) the benchmark's runs and turns them into records.

    With ``report_only`` nothing is trained: a run that has not finished raises ``Pending``.
    """

    def __init__(self, setting: Setting, out: Path, quiet: bool, report_only: bool = False) -> None:
        self.setting, self.out, self.quiet, self.report_only = setting, out, quiet, report_only
        self.runs = out / "runs" / "generalization_gap"
        self.pending: list[str] = []

    def run(self, method: Method, budget: str, lr: float, seed: int) -> dict[str, Any]:
        """Train (or recall) one run; return its record (an ``error`` when it stopped early)."""
        config = run_config(self.setting, method, budget, lr, seed)
        folder = _folder(self.runs, method, config)
        if self.report_only and not ((folder / "model.pt").exists() or (folder / "error.json").exists()):
            raise Pending(f"{budget} {method.name} lr={lr:g} seed={seed}")
        t0 = time.perf_counter()
        run = flb.run(config, clients=CLIENTS, out=folder, progress=False, on_error="record")
        df = run.rounds
        last = df.iloc[-1]
        steps = int(config["num-server-rounds"])
        if method.teacher == "post-local":
            steps = int(config["teacher-switch"]) + (steps - int(config["teacher-switch"])) * int(config["teacher-local-steps"])
        elif method.teacher == "swap":
            steps += int(config["teacher-local-steps"]) - 1
        per_round = df["wall_s"].diff().iloc[2:]
        rec = {
            "method": method.name, "lr": lr, "seed": seed, "model": self.setting.model,
            "global_batch": int(config["global-batch-size"]), "steps": steps, "rounds": int(config["num-server-rounds"]),
            "samples": int(last["samples_seen"]) if "samples_seen" in df else 0,
            "val_accuracy": float(last.get("val_accuracy", float("nan"))) if not run.error else float("nan"),
            "test_accuracy": float(last.get("test_accuracy", float("nan"))) if not run.error else float("nan"),
            "final_train_loss": final_train_loss(df, self.setting.train_limit) if len(df) > 1 else float("nan"),
            "round_s_median": float(per_round.median()) if len(per_round) else float("nan"),
            "teacher_s_median": float(df["teacher_time_s"].iloc[1:].median()) if "teacher_time_s" in df else float("nan"),
            "wall_s": float(last["wall_s"]), "cached": run.cached, "error": run.error, "folder": str(run.folder),
            "source": "app",
        }
        if not self.quiet and not run.cached:
            print(f"  {budget:<16} {method.name:<12} lr={lr:<9g} seed={seed} val={rec['val_accuracy']:.4f} "
                  f"test={rec['test_accuracy']:.4f} loss={rec['final_train_loss']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s){'  ' + run.error[:60] if run.error else ''}", flush=True)
        return rec

    def tune(self, method: Method, budget: str) -> tuple[float, list[dict[str, Any]]]:
        """Choose the learning rate on validation (seed 0); slide the window once off an edge."""
        low = EQUAL_ITER_LOW if budget == "equal-iterations" and method.name == "small" else method.low
        n = self.setting.grid_size
        if n == 1:
            return low, []
        grid = [low * 2**i for i in range(n)]
        trials = [self.run(method, budget, lr, TUNE_SEED) for lr in grid]
        score = lambda r: -1.0 if math.isnan(r["val_accuracy"]) else r["val_accuracy"]  # noqa: E731
        best = max(range(n), key=lambda i: score(trials[i]))
        slid = ""
        if best in (0, n - 1):
            lr = grid[0] / 2 if best == 0 else grid[-1] * 2
            slid = "down" if best == 0 else "up"
            trials.append(self.run(method, budget, lr, TUNE_SEED))
        chosen = max(trials, key=score)
        rows = [{"budget": budget, **t, "chosen": t is chosen, "slid": slid} for t in trials]
        return chosen["lr"], rows

    def budget(self, budget: str, methods: list[Method]) -> tuple[list[dict], list[dict]]:
        """Tune, then run the evaluation seeds, for every method of a budget."""
        tuning, final = [], []
        for method in methods:
            try:
                lr, rows = self.tune(method, budget)
            except Pending as why:
                self.pending.append(f"{budget} {method.name}: tuning ({why})")
                continue
            tuning += rows
            for seed in self.setting.seeds:
                try:
                    final.append({"budget": budget, **self.run(method, budget, lr, seed)})
                except Pending as why:
                    self.pending.append(str(why))
        return tuning, final


def in_method_order(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame by budget, then in ``METHODS`` order (whatever order the runs took)."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    order = {m: i for i, m in enumerate(METHODS)}
    return df.sort_values(["budget", "method"], key=lambda c: c.map(order) if c.name == "method" else c, kind="stable")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("FLB_DATA_DIR", ""))
    p.add_argument("--methods", default=",".join(m for m in METHODS if m not in SKIPPED),
                   help=f"which methods, in the order they run (of: {', '.join(METHODS)})")
    p.add_argument("--grid-size", type=int, default=3, help="learning rates per method (the same for every method)")
    p.add_argument("--small-source", choices=("torch", "app"), default="torch",
                   help="small batch at equal epochs: the plain-PyTorch gap search's runs, or 6,250 rounds through the apps")
    p.add_argument("--gap-search", default="experiments/results/gap_search_runs.jsonl", help="the gap search's runs")
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--quick", action="store_true", help="tiny: digits, 256 examples, 1 seed, 1 learning rate")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report", action="store_true", help="train nothing: summarise the runs finished so far")
    p.add_argument("--markdown", action="store_true", help="also print the summary as markdown tables")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the benchmark (or read it back) and write its outputs; return the summary."""
    args = _parse(argv)
    import torch

    torch.set_num_threads(1)
    setting = Setting(data_dir=args.data_dir, grid_size=args.grid_size)
    suffix = ""
    if args.quick:
        setting = Setting(dataset="digits", model="mlp", train_limit=256, epochs=2, small=8, grid_size=1, seeds=(1,))
        suffix = "_quick"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or setting.grid_size < 1:
        raise SystemExit(f"bad arguments: methods {unknown} (allowed: {', '.join(METHODS)}), grid-size {setting.grid_size} (>= 1)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(setting, out, args.quiet, report_only=args.report)
    chosen = [METHODS[m] for m in methods]
    from_torch = "small" in methods and args.small_source == "torch" and not args.quick
    tuning, final = bench.budget("equal-epochs", [m for m in chosen if not (from_torch and m.name == "small")])
    if from_torch:
        t, f = small_reference(Path(args.gap_search), setting)
        tuning, final = t + tuning, f + final
    if "small" in methods:  # equal iterations: the large-batch runs are those of equal epochs
        t, f = bench.budget("equal-iterations", [METHODS["small"]])
        tuning += t
        final += f + [dict(r, budget="equal-iterations") for r in final if r["method"] != "small"]
    final_df, tuning_df = in_method_order(final), in_method_order(tuning)
    if final_df.empty:
        print("no run finished yet:", *bench.pending, sep="\n  ")
        return pd.DataFrame()
    return _write_and_report(final_df, tuning_df, out, suffix, bench, setting, args.markdown)


def _write_and_report(final_df: pd.DataFrame, tuning_df: pd.DataFrame, out: Path, suffix: str, bench: Bench,
                      setting: Setting, as_markdown: bool) -> pd.DataFrame:
    atomic_write_text(out / f"generalization_gap{suffix}.csv", final_df.to_csv(index=False))
    atomic_write_text(out / f"generalization_gap_tuning{suffix}.csv", tuning_df.to_csv(index=False))
    learned = learned_gains(final_df)
    if learned is not None:
        atomic_write_text(out / f"generalization_gap_learned{suffix}.csv", learned.to_csv(index=False))
    summary = summarise(final_df)
    plot(summary, learned, out / f"generalization_gap{suffix}.png")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for line in goal_check(summary):
        print(line)
    for line in bench.pending:
        print(f"not finished yet: {line}")
    if as_markdown:
        print(markdown(summary, len(setting.seeds)))
    eq = final_df[(final_df.budget == "equal-epochs") & (final_df.global_batch == setting.large)]
    for method, g in eq.groupby("method", sort=False):
        t, r = g.teacher_s_median.median(), g.round_s_median.median()
        print(f"teacher overhead {method}: {1000 * t:.2f} ms per round = {100 * t / r:.2f}% of a {r:.3f} s round")
    return summary


if __name__ == "__main__":
    main()
