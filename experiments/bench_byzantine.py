"""Byzantine clients against the robust aggregators, through the product's server step.

``python -m experiments.bench_byzantine [--quick] [--datasets digits,mnist[,cifar10]] [--seeds 3] [--first-seed 1]
[--rounds R] [--lr LR] [--global-batch B] [--weight-decay WD] [--momentum M] [--cc-drop-ratio R] [--data-dir DIR]
[--out DIR]``

n = 20 clients, each an IID partition of the training split (``workloads.partition``, seeded
by the run seed), each sending the gradient of its own batch of b_i = B / 20 examples, drawn
as the ClientApp draws (an epoch-wise shuffle of its partition seeded by seed * 7919 + partition).
Partitions 0..f-1 are Byzantine and collude (experiments/attacks.py): f = 4 (20%) for ``alie``,
``sign-flip``, ``label-flip`` and ``bit-flip``, f = 8 (40%) for ``ipm``; ``clean`` has none.
Every round goes through the product's ``plan_round`` and ``server_step`` (reply checks, the
norm guard, the aggregator, server SGD with momentum 0.9 (``--momentum``) and the run's lr schedule), with
``min-batch-fraction = 0.5`` so that rejected attackers do not stop the round, and
``byzantine-fraction = f / n`` (0.2 for ``clean``): Krum and the trimmed mean are told the
true f. ``absent-4`` and ``absent-8`` (only through ``--attacks``) are the oracle: partitions
0..f-1 send nothing, so each round is the honest clients' step on their share of the data, the
best any aggregator could do if it recognised every attacker. ``alie-paper``, ``ipm-paper``,
``sign-flip-paper`` and ``label-flip-paper`` (also only through ``--attacks``) are the attacks as
Karimireddy et al.'s released code runs them, on the momenta the aggregator sees
(``attacks.momentum_space``). A run whose round fails
(``RoundFailure``, ``DivergenceError``) stops there and is recorded as failed, with the
accuracy of its last model.

Full run: every aggregator x every attack x seeds F..F+S-1 (``--first-seed`` F, default 1, ``--seeds`` S);
writes ``<out>/bench_byzantine.csv`` (one row per run) and its plot (``--plot``, default
``<out>/bench_byzantine.png``, never a committed figure unless named), prints mean +- std of the final test accuracy.
``--quick``: MNIST, seed 1, only the five runs of the last line, which reads
``clean=<acc> mean_alie=<acc> cc_alie=<acc> mean_ipm=<acc> cc_ipm=<acc>``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from experiments import attacks
from experiments.attacks import ABSENT, ATTACKS, CONDITIONS, N_CLIENTS, PAPER
from experiments.byzantine_args import (SCALES, Scale, add_momentum_arg, add_ratio_args, add_weight_decay_arg, first_unknown,
                                      grid_runs, overridden)
from experiments.byzantine_report import gap_table, paired_gaps, plot, quick_line, summary
from strategies.robust import flatten, unflatten
from strategies.server_state import ServerState
from strategies.server_step import ClientReply, RunSetup, StepError, StepPlan, plan_round, server_step
from strategies.teachers import IdentityTeacher
from workloads.config import AGGREGATORS, RunConfig
from workloads.data import Splits, load_splits
from workloads.files import atomic_write_text
from workloads.models import build_model
from workloads.partition import client_partition
from workloads.registry import WORKLOADS, resolve_model
from workloads.training import batch_gradient, draw_batch, evaluate

QUICK_RUNS = (("mean", "clean"), ("mean", "alie"), ("centered-clip", "alie"), ("mean", "ipm"), ("centered-clip", "ipm"))
NODE_BASE = 1000  # node id of partition p is NODE_BASE + p


@dataclass(frozen=True)
class Bench:
    """One dataset and seed: the splits, the clients' partitions, a model to compute gradients with."""

    dataset: str
    splits: Splits
    parts: tuple[torch.Tensor, ...]  # training indices of partition p
    model: nn.Module
    loss_fn: nn.Module
    seed: int

    @classmethod
    def create(cls, dataset: str, data_dir: str, seed: int) -> Bench:
        """Load ``dataset`` and split its training examples into ``N_CLIENTS`` IID partitions of ``seed``."""
        splits = load_splits(dataset, data_dir if dataset != "digits" else "", 0.1)
        labels = splits.y_train.numpy()
        parts = tuple(torch.from_numpy(np.asarray(client_partition(labels, p, N_CLIENTS, "iid", 0.5, seed)))
                      for p in range(N_CLIENTS))
        w = WORKLOADS[dataset]
        model = build_model(resolve_model(dataset, "auto"), w.input_shape, w.num_classes, seed)
        return cls(dataset, splits, parts, model, w.loss(), seed)

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return WORKLOADS[self.dataset].num_classes

    def draw(self, state: ServerState, pid: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Partition ``pid``'s next batch of ``b`` examples, as ``client_app.job`` draws it."""
        part = self.parts[pid]
        epoch, cursor = divmod(state.drawn.get(pid, 0), len(part))
        pos, _, _ = draw_batch(len(part), b, self.seed * 7919 + pid, epoch, cursor)
        idx = part[pos]
        return self.splits.x_train.index_select(0, idx), self.splits.y_train.index_select(0, idx)

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The flat mean-loss gradient of the current model on ``(x, y)``, and the mean loss."""
        loss = batch_gradient(self.model, self.loss_fn, self.splits.inputs, x, y)
        return flatten([p.grad for p in self.model.parameters()]), loss


def run_config(dataset: str, aggregator: str, attack: str, scale: Scale, seed: int,
               radius_scale: float | None = None, bucket_size: int = 1, drop_ratio: float | None = None) -> RunConfig:
    """The run config of one run: the defaults but for the keys the module docstring names.

    ``radius_scale`` None keeps the run-config default ``cc-radius-scale``; ``drop_ratio`` None, ``scale``'s.
    """
    f = CONDITIONS[attack]
    drop = scale.cc_drop_ratio if drop_ratio is None else drop_ratio
    keys = {k: v for k, v in (("cc-radius-scale", radius_scale), ("cc-drop-ratio", drop),
                              ("weight-decay", scale.weight_decay), ("momentum", scale.momentum),
                              ("exclude-ratio", None if aggregator == "mean" else scale.exclude_ratio)) if v is not None}
    return RunConfig.from_mapping({
        "dataset": dataset, "aggregator": aggregator, "num-server-rounds": scale.rounds,
        "global-batch-size": scale.global_batch, "lr": scale.lr, "seed": seed, "min-batch-fraction": 0.5,
        "byzantine-fraction": f / N_CLIENTS if f else 0.2, "bucket-size": bucket_size, **keys})


def client_vectors(bench: Bench, attack: str, state: ServerState, plan: StepPlan,
                   generator: torch.Generator) -> dict[int, tuple[torch.Tensor, float]]:
    """What each sampled partition sends this round: (flat gradient, train loss).

    Partitions below f run ``attack``; they report the honest clients' mean loss. ALIE and IPM
    compute one vector from the honest gradients, which all f attackers send. ``absent-f``:
    partitions below f send nothing.
    """
    if attack not in CONDITIONS:
        raise ValueError(f"unknown attack {attack!r}; allowed: {', '.join(CONDITIONS)}")
    f = CONDITIONS[attack]
    batches = {pid: bench.draw(state, pid, b) for pid, b in plan.assigned.values()}
    own = {pid: bench.gradient(*xy) for pid, xy in batches.items() if pid >= f or attack in ("sign-flip", "bit-flip")}
    loss = float(np.mean([own[p][1] for p in own if p >= f]))
    out = {p: own[p] for p in own if p >= f}
    if attack in ABSENT:
        return out
    shared = None
    if attack in ("alie", "ipm"):
        honest = torch.stack([own[p][0] for p in sorted(out)])
        shared = attacks.alie(honest, N_CLIENTS, f) if attack == "alie" else attacks.ipm(honest, 0.1)
    for pid in sorted(p for p in batches if p < f):
        if shared is not None:
            vec = shared
        elif attack == "sign-flip":
            vec = attacks.sign_flip(own[pid][0])
        elif attack == "bit-flip":
            vec = attacks.bit_flip(own[pid][0], generator)
        else:  # label-flip
            vec = flatten(attacks.label_flip(bench.model, bench.loss_fn, bench.splits.inputs, *batches[pid],
                                             bench.num_classes))
        out[pid] = (vec, loss)
    return out


def reply(node: int, pid: int, b: int, vec: torch.Tensor, names: list[str], like: list[torch.Tensor],
          loss: float) -> ClientReply:
    """A well-formed train reply carrying ``vec`` (flat) as the gradient of ``b`` examples."""
    metrics = {"num-examples": b, "train-loss": loss, "compute-s": 0.0, "peak-mem-mb": math.nan,
               "predicted-peak-mb": 1.0, "budget-mb": 0.0, "max-batch": 0, "micro-batch-size": b, "partition-id": pid}
    return ClientReply(node, pid, grads=dict(zip(names, unflatten(vec, like))), metrics=metrics)


def run_one(bench: Bench, aggregator: str, attack: str, scale: Scale, radius_scale: float | None = None,
            bucket_size: int = 1, drop_ratio: float | None = None,
            on_round: Callable[[ServerState, ServerState], None] | None = None) -> dict:
    """One run from a fresh model of ``bench.seed``; its CSV row (module docstring).

    ``on_round(before, after)``, if given, sees the server state before and after every step taken."""
    start, f = time.perf_counter(), CONDITIONS[attack]
    base = attack.removesuffix("-paper")  # the paper's attacks start from ours (experiments.attacks.momentum_space)
    w = WORKLOADS[bench.dataset]
    fresh = build_model(resolve_model(bench.dataset, "auto"), w.input_shape, w.num_classes, bench.seed)
    names = [n for n, _ in fresh.named_parameters()]
    setup = RunSetup.create(run_config(bench.dataset, aggregator, attack, scale, bench.seed, radius_scale, bucket_size,
                                       drop_ratio),
                            fresh.state_dict(), names, IdentityTeacher())
    state = ServerState.initial(fresh.state_dict(), bench.seed, setup.teacher.state_dict())
    usable = {NODE_BASE + p: p for p in range(N_CLIENTS)}
    tracked: dict[int, torch.Tensor] = {}  # the paper's attacks: every partition's momentum, as the attackers track it
    generator = torch.Generator().manual_seed(bench.seed * 1_000_003 + 17)
    status, rejected = "ok", {"byzantine": 0, "honest": 0}
    for _ in range(scale.rounds):
        state, plan = plan_round(state, setup, usable, N_CLIENTS)
        bench.model.load_state_dict(state.model)
        like = [state.model[n] for n in names]
        sent = client_vectors(bench, base, state, plan, generator)
        if attack in PAPER:
            cfg = setup.cfg
            moved = attacks.momentum_space({p: v for p, (v, _) in sent.items()}, list(range(f)), base, tracked,
                                           cfg.momentum, cfg.weight_decay * flatten(like), N_CLIENTS)
            sent = {p: (moved[p], loss) for p, (_, loss) in sent.items()}
        replies = [reply(node, pid, b, sent[pid][0], names, like, sent[pid][1])
                   for node, (pid, b) in plan.assigned.items() if pid in sent]
        try:
            before, (state, record) = state, server_step(state, replies, plan)
            failures = record.check.failures
            if on_round is not None:
                on_round(before, state)
        except StepError as err:
            status = f"failed in round {plan.round}: {type(err).__name__}"
            failures = err.check.failures if err.check is not None else []
        for row in failures:
            rejected["byzantine" if row["partition_id"] < f else "honest"] += 1
        if status != "ok":
            break
    test_acc, val_acc = final_accuracies(bench, state, scale.val_examples)
    return {"dataset": bench.dataset, "aggregator": aggregator, "attack": attack, "f": f, "seed": bench.seed,
            "global_batch": scale.global_batch, "lr": scale.lr, "weight_decay": setup.cfg.weight_decay,
            "cc_drop_ratio": setup.cfg.cc_drop_ratio, "momentum": setup.cfg.momentum,
            "exclude_ratio": setup.cfg.exclude_ratio, "excluded_byzantine": sum(p < f for p in state.persistence.excluded),
            "excluded_honest": sum(p >= f for p in state.persistence.excluded), "test_accuracy": test_acc, "val_accuracy": val_acc,
            "rounds": state.round, "seconds": time.perf_counter() - start, "status": status,
            "rejected_byzantine": rejected["byzantine"], "rejected_honest": rejected["honest"]}


def val_accuracy(bench: Bench, model: dict[str, torch.Tensor], val_examples: int) -> float:
    """Validation accuracy of ``model`` on the first ``val_examples`` of the validation split (0 = all)."""
    bench.model.load_state_dict(model)
    s = bench.splits
    n_val = val_examples or len(s.y_val)
    return evaluate(bench.model, bench.loss_fn, s.inputs, s.x_val[:n_val], s.y_val[:n_val])[1]


def final_accuracies(bench: Bench, state: ServerState, val_examples: int) -> tuple[float, float]:
    """Test accuracy (the whole test split) and validation accuracy (``val_accuracy``)."""
    val = val_accuracy(bench, state.model, val_examples)
    _, test = evaluate(bench.model, bench.loss_fn, bench.splits.inputs, bench.splits.x_test, bench.splits.y_test)
    return test, val


def run_grid(datasets: list[str], seeds: range, runs: list[tuple[str, str]], scales: dict[str, Scale],
             data_dir: str, csv: Path) -> pd.DataFrame:
    """Every (aggregator, attack) of ``runs`` on every dataset and seed of ``seeds``, progress printed.

    ``csv`` is rewritten (atomically) after every run, so an interrupted grid keeps its finished runs.
    """
    rows = []
    total = len(datasets) * len(seeds) * len(runs)
    for dataset in datasets:
        for seed in seeds:
            bench = Bench.create(dataset, data_dir, seed)
            for aggregator, attack in runs:
                rows.append(run_one(bench, aggregator, attack, scales[dataset]))
                r = rows[-1]
                print(f"[{len(rows)}/{total}] {dataset} seed {seed} {aggregator:<13} {attack:<10} f={r['f']} "
                      f"test {r['test_accuracy']:.4f} val {r['val_accuracy']:.4f} rounds {r['rounds']} "
                      f"rejected {r['rejected_byzantine']}+{r['rejected_honest']} excluded {r['excluded_byzantine']}+"
                      f"{r['excluded_honest']} {r['seconds']:.1f} s {r['status']}",
                      flush=True)
                atomic_write_text(csv, pd.DataFrame(rows).to_csv(index=False))
    return pd.DataFrame(rows)


def add_run_args(p: argparse.ArgumentParser, rounds: int) -> None:
    """The options of a script that runs single seeds of this benchmark (``run_setting`` reads them)."""
    p.add_argument("--dataset", default="digits", choices=sorted(SCALES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--global-batch", type=int, default=0, help=f"B, a multiple of {N_CLIENTS}; 0 = the dataset's")
    p.add_argument("--lr", type=float, default=0.0, help="peak lr; 0 = the dataset's")
    add_weight_decay_arg(p)
    add_momentum_arg(p)
    p.add_argument("--data-dir", default=os.environ.get("FLB_DATA_DIR", ""))


def run_setting(args: argparse.Namespace) -> tuple[Scale, Bench]:
    """The scale and bench of ``add_run_args``' options (a bad B, weight decay or momentum exits, named); one
    thread."""
    torch.set_num_threads(1)
    scale = overridden(SCALES[args.dataset], args.rounds, args.global_batch, args.lr, args.weight_decay,
                       momentum=args.momentum)
    return scale, Bench.create(args.dataset, args.data_dir, args.seed)


def main(argv: list[str] | None = None) -> None:
    """Run the grid (or the quick subset), write the CSV and the plot, print the table and the last line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="MNIST, seed 1, the five runs of the last line")
    p.add_argument("--datasets", default="digits,mnist")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=1, help="seeds are first-seed .. first-seed + seeds - 1")
    p.add_argument("--rounds", type=int, default=0, help="rounds of every run; 0 = the dataset's (SCALES)")
    p.add_argument("--lr", type=float, default=0.0, help="peak lr of every run; 0 = the dataset's (SCALES)")
    p.add_argument("--global-batch", type=int, default=0,
                   help=f"global batch B of every run, a multiple of {N_CLIENTS} (b_i = B / {N_CLIENTS}); 0 = the dataset's")
    add_weight_decay_arg(p)
    add_ratio_args(p)
    add_momentum_arg(p)
    p.add_argument("--aggregators", default=",".join(AGGREGATORS), help="comma-separated subset of the aggregators")
    p.add_argument("--attacks", default=",".join(ATTACKS),
                   help="comma-separated attacks and 'clean'; the oracle 'absent-4', 'absent-8' only when named")
    p.add_argument("--data-dir", default=os.environ.get("FLB_DATA_DIR", ""))
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--plot", default="", help="the bars' PNG; default: <out>/bench_byzantine.png")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    datasets = ["mnist"] if args.quick else [d for d in args.datasets.split(",") if d]
    if (bad := first_unknown(datasets, SCALES)) is not None:
        raise SystemExit(f"--datasets = {args.datasets!r}: {bad!r} is not one of {', '.join(SCALES)}")
    scales = {d: overridden(s, args.rounds, args.global_batch, args.lr, args.weight_decay, args.cc_drop_ratio,
                            args.momentum, args.exclude_ratio) for d, s in SCALES.items()}
    if args.seeds < 1 or args.first_seed < 1:
        raise SystemExit(f"--seeds = {args.seeds}, --first-seed = {args.first_seed}: both must be >= 1")
    seeds = range(1, 2) if args.quick else range(args.first_seed, args.first_seed + args.seeds)
    runs = list(QUICK_RUNS) if args.quick else grid_runs(args.aggregators, args.attacks)
    for d in datasets:
        s = scales[d]
        wd, drop, mom, excl = ("the run-config default" if v is None else f"{v:g}"
                               for v in (s.weight_decay, s.cc_drop_ratio, s.momentum, s.exclude_ratio))
        print(f"{d}: n = {N_CLIENTS}, B = {s.global_batch} (b_i = {s.global_batch // N_CLIENTS}), {s.rounds} rounds, "
              f"lr {s.lr:g} (warmup 2, cosine), momentum {mom}, weight decay {wd}, cc-drop-ratio {drop}, "
              f"exclude-ratio {excl}, "
              f"seeds {seeds[0]}..{seeds[-1]}, "
              f"{len(runs)} runs per seed", flush=True)
    start = time.perf_counter()
    df = run_grid(datasets, seeds, runs, scales, args.data_dir,
                  Path(args.out) / f"bench_byzantine{'_quick' if args.quick else ''}.csv")
    print(f"{len(df)} runs in {time.perf_counter() - start:.0f} s; mean seconds per run: "
          + ", ".join(f"{d} {df[df.dataset == d].seconds.mean():.1f}" for d in datasets))
    if not args.quick:
        for d in datasets:
            print(f"\n{d}: final test accuracy (%), mean ± std over {len(seeds)} seeds (*k: k runs failed)\n"
                  + summary(df, d))
            for split in ("val", "test"):
                for floor, ref in ((False, "the clean mean run of the same seed"),
                                   (True, "the mean run of the same seed without the f attackers (absent-f)")):
                    if not (gaps := paired_gaps(df, d, split=split, floor=floor)).empty:
                        print(f"\n{d}: centered-clip minus {ref}, {split} accuracy\n" + gap_table(gaps))
        png = Path(args.plot or Path(args.out) / "bench_byzantine.png")
        print(f"plot: {png}" if plot(df, png) else "plot: skipped (matplotlib not installed)")
    if {tuple(r) for r in QUICK_RUNS} <= set(zip(df.aggregator, df.attack)) and "mnist" in datasets:
        print(quick_line(df[df.dataset == "mnist"]))


if __name__ == "__main__":
    main()
