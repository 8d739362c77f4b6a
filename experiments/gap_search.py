"""Search for a CPU setting with a large-batch generalisation gap (plain PyTorch, one thread).

``python -m experiments.gap_search --data-dir DIR [--dataset cifar10] [--model cnn]
[--train-limit 5000] [--epochs 40] [--small 32] [--ratio 16] [--augment] [--lr-low 0.0125]``
``python -m experiments.gap_search --summary``

Without BatchNorm the federated step (weighted mean of client gradients, one ServerSGD step)
is exactly minibatch SGD on the union batch, so this script trains centrally with the repo's
own pieces: ``load_splits``, ``augment_crop_flip``, ``build_model``, ``draw_batch``,
``batch_gradient``, ``evaluate``, ``ServerSGD`` (momentum 0.9, weight decay 5e-4) and
``lr_at`` (linear warm-up over ``warmup_frac`` of the steps, then cosine).

Protocol for one setting, for the small batch and for ``ratio`` times it (equal epochs):

1. tune the learning rate on the validation split with seed 0 over a window of five values a
   factor 2 apart; while the best is at an edge of the window, slide the window one step;
2. run seeds 1, 2, 3 at the chosen learning rate; report test accuracy as mean and std.

Every finished run is appended as one JSON line to ``--out``; a run already there is skipped,
so an interrupted search resumes. These runs are plain PyTorch, not app runs, so they are not in
flb's run cache (results folders keyed by the app's run config); the committed JSONL is also what
``experiments/generalization_gap.py`` reads as its small batch at equal epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from strategies.server_opt import ServerSGD, lr_at
from workloads.data import augment_crop_flip, load_splits
from workloads.models import MODELS, build_model
from workloads.registry import WORKLOADS
from workloads.training import batch_gradient, draw_batch, evaluate

OUT = Path(__file__).resolve().parent / "results" / "gap_search_runs.jsonl"
KEY_FIELDS = ("dataset", "model", "train_limit", "epochs", "batch", "lr", "seed", "augment",
              "warmup_frac", "momentum", "weight_decay")


def cnn_gn(input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...] = (32, 64, 128),
           hidden: int = 256, groups: int = 8) -> nn.Module:
    """The repo's ``cnn`` with GroupNorm after every convolution (search-only model)."""
    channels, size, _ = input_shape
    layers: list[nn.Module] = []
    for width in widths:
        if size < 4:
            break
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(groups, width), nn.ReLU(),
                   nn.MaxPool2d(2)]
        channels, size = width, size // 2
    layers += [nn.Flatten(), nn.Linear(channels * size * size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def cnn_wide(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The repo's ``cnn`` with doubled widths (64, 128, 256) and a 512-unit hidden layer."""
    return MODELS["cnn"](input_shape, num_classes, widths=(64, 128, 256), hidden=512)


LOCAL_MODELS = {"cnn_gn": cnn_gn, "cnn_wide": cnn_wide}


def make_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build a repo model through ``build_model``, or a local one with the same seeding."""
    if name not in LOCAL_MODELS:
        return build_model(name, input_shape, num_classes, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LOCAL_MODELS[name](input_shape, num_classes)


def run_key(cfg: dict) -> str:
    """The identity of a run: its settings, as sorted JSON."""
    return json.dumps({k: cfg[k] for k in KEY_FIELDS}, sort_keys=True)


def load_runs(path: Path) -> dict[str, dict]:
    """Return the finished runs in ``path`` by key (empty when the file does not exist)."""
    if not path.exists():
        return {}
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {run_key(r): r for r in runs}


def train(cfg: dict, data_dir: str, micro_batch: int) -> dict:
    """Train one run and return its record (settings plus losses, accuracies, wall seconds)."""
    t0 = time.perf_counter()
    workload = WORKLOADS[cfg["dataset"]]
    splits = load_splits(cfg["dataset"], data_dir, 0.1, cfg["train_limit"])
    loss_fn = workload.loss()
    model = make_model(cfg["model"], workload.input_shape, workload.num_classes, cfg["seed"])
    params = list(model.parameters())
    opt = ServerSGD(momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    augment = cfg["augment"]

    def inputs(x: torch.Tensor) -> torch.Tensor:
        out = splits.inputs(x)
        return augment_crop_flip(out, gen) if augment else out

    n, b = len(splits.y_train), cfg["batch"]
    steps = math.ceil(cfg["epochs"] * n / b)
    warmup = max(1, round(cfg["warmup_frac"] * steps))
    per_epoch = math.ceil(n / b)
    epoch = cursor = 0
    losses: list[float] = []
    diverged = False
    for t in range(1, steps + 1):
        pos, epoch, cursor = draw_batch(n, b, cfg["seed"], epoch, cursor)
        loss = batch_gradient(model, loss_fn, inputs, splits.x_train[pos], splits.y_train[pos], micro_batch)
        if not math.isfinite(loss) or loss > 1e3:
            diverged = True
            break
        losses.append(loss)
        opt.step(params, [p.grad for p in params], lr_at(t, steps, cfg["lr"], warmup, "cosine"))
    model.eval()
    train_full, train_acc = evaluate(model, loss_fn, splits.inputs, splits.x_train, splits.y_train, 256)
    _, val_acc = evaluate(model, loss_fn, splits.inputs, splits.x_val, splits.y_val, 256)
    test_loss, test_acc = evaluate(model, loss_fn, splits.inputs, splits.x_test, splits.y_test, 256)
    if diverged:
        train_full, val_acc, test_acc = float("nan"), 0.1, 0.1
    return {
        **cfg, "steps": steps, "warmup_steps": warmup, "diverged": diverged,
        "train_loss_last_epoch": float(np.mean(losses[-per_epoch:])) if losses else float("nan"),
        "train_loss_full": train_full, "train_acc": train_acc, "val_acc": val_acc,
        "test_acc": test_acc, "test_loss": test_loss, "wall_s": time.perf_counter() - t0,
    }


class Search:
    """Runs (or recalls from the JSONL file) the runs of one setting."""

    def __init__(self, base: dict, data_dir: str, micro_batch: int, out: Path) -> None:
        self.base, self.data_dir, self.micro_batch, self.out = base, data_dir, micro_batch, out
        self.done = load_runs(out)

    def run(self, batch: int, lr: float, seed: int) -> dict:
        """Return the record of one run, training it first if it is not in the file."""
        cfg = {**self.base, "batch": batch, "lr": lr, "seed": seed}
        key = run_key(cfg)
        if key in self.done:
            return self.done[key]
        rec = train(cfg, self.data_dir, self.micro_batch if batch > self.micro_batch else 0)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self.done[key] = rec
        print(f"  B={batch:5d} lr={lr:<9.5g} seed={seed} steps={rec['steps']:5d} "
              f"loss(last ep)={rec['train_loss_last_epoch']:.4f} loss(full)={rec['train_loss_full']:.4f} "
              f"val={rec['val_acc']:.4f} test={rec['test_acc']:.4f} {rec['wall_s']:.0f}s", flush=True)
        return rec

    def tune(self, batch: int, low: float, width: int = 5, max_slides: int = 3) -> float:
        """Pick the lr with the best validation accuracy (seed 0), sliding the window off edges."""
        for _ in range(max_slides + 1):
            grid = [low * 2**i for i in range(width)]
            vals = [self.run(batch, lr, 0)["val_acc"] for lr in grid]
            best = int(np.argmax(vals))
            if best == 0:
                low /= 2
            elif best == width - 1:
                low *= 2
            else:
                break
        return grid[best]


def summary(path: Path) -> None:
    """Print one row per setting and batch: chosen lr, losses, test accuracy over seeds 1-3."""
    runs = list(load_runs(path).values())
    if not runs:
        print("no runs yet")
        return
    setting_fields = [k for k in KEY_FIELDS if k not in ("batch", "lr", "seed")]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in setting_fields) + (r["batch"],), []).append(r)
    print("dataset model limit ep aug | B | grid lr:val | lr* | steps | loss last ep / full "
          "| test acc (seeds 1-3) | s/run")
    for key in sorted(groups, key=str):
        rs = groups[key]
        tuning = sorted((r for r in rs if r["seed"] == 0), key=lambda r: r["lr"])
        if not tuning:
            continue
        best = max(tuning, key=lambda r: r["val_acc"])
        grid = " ".join(f"{r['lr']:g}:{r['val_acc'] * 100:.1f}" for r in tuning)
        seeded = sorted({r["lr"] for r in rs if r["seed"] != 0}, key=lambda lr: lr != best["lr"])
        for lr in seeded or [best["lr"]]:
            seeds = [r for r in rs if r["seed"] != 0 and r["lr"] == lr]
            accs = np.array([r["test_acc"] for r in seeds]) * 100
            acc = f"{accs.mean():.2f} +- {accs.std(ddof=1) if len(accs) > 1 else 0:.2f} (n={len(accs)})" if len(accs) else "-"
            shown = seeds or [best]
            mark = "" if lr == best["lr"] else " (extra, not chosen)"
            print(f"{key[0]} {key[1]} {key[2]} {key[3]} {int(key[4])} | {key[-1]} | {grid} | {lr:g}{mark} | "
                  f"{shown[0]['steps']} | {np.mean([r['train_loss_last_epoch'] for r in shown]):.4f} / "
                  f"{np.mean([r['train_loss_full'] for r in shown]):.4f} | {acc} | "
                  f"{np.mean([r['wall_s'] for r in rs if not r['diverged']]):.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/work/shared/data")
    p.add_argument("--dataset", default="cifar10", choices=sorted(WORKLOADS))
    p.add_argument("--model", default="cnn", choices=sorted(set(MODELS) | set(LOCAL_MODELS)))
    p.add_argument("--train-limit", type=int, default=5000)
    p.add_argument("--epochs", type=float, default=40)
    p.add_argument("--small", type=int, default=32, help="small global batch")
    p.add_argument("--ratio", type=int, default=16, help="large batch = ratio * small")
    p.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR-10 only)")
    p.add_argument("--lr-low", type=float, default=0.0125, help="lowest lr of the small batch's window")
    p.add_argument("--lr-low-large", type=float, default=0.0, help="same for the large batch (default: 2x lr-low)")
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seeds", type=int, default=3, help="fresh seeds 1..N at the chosen lr")
    p.add_argument("--extra-large-lr", type=float, nargs="*", default=[],
                   help="also run the seeds of the large batch at these lrs (e.g. the one whose train loss matches)")
    p.add_argument("--tune-only", action="store_true", help="stop after choosing the learning rates")
    p.add_argument("--micro-batch", type=int, default=64, help="gradient accumulation chunk (same gradient)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--summary", action="store_true", help="print the table of --out and exit")
    args = p.parse_args()
    if args.summary:
        summary(args.out)
        return
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = {"dataset": args.dataset, "model": args.model, "train_limit": args.train_limit,
            "epochs": args.epochs, "augment": bool(args.augment and WORKLOADS[args.dataset].augment),
            "warmup_frac": args.warmup_frac, "momentum": args.momentum, "weight_decay": args.weight_decay}
    search = Search(base, args.data_dir, args.micro_batch, args.out)
    print(f"setting {base}", flush=True)
    large = args.small * args.ratio
    chosen = {}
    for batch, low in ((args.small, args.lr_low), (large, args.lr_low_large or 2 * args.lr_low)):
        print(f"tuning B={batch}", flush=True)
        chosen[batch] = search.tune(batch, low)
        print(f"B={batch}: lr* = {chosen[batch]:g}", flush=True)
    if not args.tune_only:
        for batch in (args.small, large):
            for seed in range(1, args.seeds + 1):
                search.run(batch, chosen[batch], seed)
        for lr in args.extra_large_lr:
            for seed in range(1, args.seeds + 1):
                search.run(large, lr, seed)
    summary(args.out)


if __name__ == "__main__":
    main()
