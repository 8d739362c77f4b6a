"""How a Byzantine run gets where it ends: validation accuracy and the model's norm every few rounds.

``python -m experiments.byz_trace [--dataset digits] [--runs mean:alie,centered-clip:alie,mean:clean]
[--seed 1] [--rounds 400] [--every 25] [--global-batch B] [--lr LR] [--weight-decay WD] [--data-dir DIR]``

One run of ``experiments.bench_byzantine`` per ``aggregator:condition`` pair, with the
benchmark's settings. Every ``--every`` rounds (and after the last) it prints
``round:val%/|w|``: the validation accuracy in % and |w|, the L2 norm (float64) of all the
model's floating-point weights and buffers. A bias that sits inside the honest spread
(ALIE) shows as |w| growing far beyond the clean run's before the accuracy falls.
"""

from __future__ import annotations

import argparse
import os

import torch

from experiments.bench_byzantine import CONDITIONS, N_CLIENTS, SCALES, Bench, overridden, run_one
from strategies.server_state import ServerState
from workloads.config import AGGREGATORS
from workloads.training import evaluate


def model_norm(state: dict[str, torch.Tensor]) -> float:
    """|w|: sqrt(sum of squares) over the floating-point entries of a state dict, in float64."""
    return sum(float((v.to(torch.float64) ** 2).sum()) for v in state.values() if v.is_floating_point()) ** 0.5


class Trace:
    """``run_one``'s ``on_round``: (round, validation accuracy, |w|) every ``every`` rounds and at ``last``."""

    def __init__(self, bench: Bench, every: int, last: int):
        self.bench, self.every, self.last = bench, every, last
        self.points: list[tuple[int, float, float]] = []

    def __call__(self, before: ServerState, after: ServerState) -> None:
        if after.round % self.every and after.round != self.last:
            return
        b = self.bench
        b.model.load_state_dict(after.model)
        _, val = evaluate(b.model, b.loss_fn, b.splits.inputs, b.splits.x_val, b.splits.y_val)
        self.points.append((after.round, val, model_norm(after.model)))


def parse_runs(text: str) -> list[tuple[str, str]]:
    """``agg:condition,...`` -> pairs; SystemExit naming the first bad pair."""
    pairs = [tuple(r.split(":")) for r in text.split(",") if r]
    for pair in pairs or [("(empty)",)]:
        if len(pair) != 2 or pair[0] not in AGGREGATORS or pair[1] not in CONDITIONS:
            raise SystemExit(f"--runs: {':'.join(pair)!r} is not aggregator:condition; aggregators "
                             f"{', '.join(AGGREGATORS)}; conditions {', '.join(CONDITIONS)}")
    return pairs  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """Run each pair once and print its trace."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", choices=sorted(SCALES))
    p.add_argument("--runs", default="mean:alie,centered-clip:alie,mean:clean")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--every", type=int, default=25, help="rounds between two points (>= 1)")
    p.add_argument("--global-batch", type=int, default=0, help=f"B, a multiple of {N_CLIENTS}; 0 = the dataset's")
    p.add_argument("--lr", type=float, default=0.0, help="peak lr; 0 = the dataset's")
    p.add_argument("--weight-decay", type=float, default=None, help="server L2 coefficient; default: run-config's")
    p.add_argument("--data-dir", default=os.environ.get("FLB_DATA_DIR", ""))
    args = p.parse_args(argv)
    runs = parse_runs(args.runs)
    if args.every < 1 or args.rounds < 1:
        raise SystemExit(f"--every = {args.every}, --rounds = {args.rounds}: both must be >= 1")
    torch.set_num_threads(1)
    scale = overridden(SCALES[args.dataset], args.rounds, args.global_batch, args.lr, args.weight_decay)
    bench = Bench.create(args.dataset, args.data_dir, args.seed)
    wd = "default" if scale.weight_decay is None else f"{scale.weight_decay:g}"
    print(f"{args.dataset} seed {args.seed}, {scale.rounds} rounds, B = {scale.global_batch}, lr {scale.lr:g}, "
          f"weight decay {wd}; round:val%/|w|", flush=True)
    for agg, cond in runs:
        trace = Trace(bench, args.every, scale.rounds)
        row = run_one(bench, agg, cond, scale, on_round=trace)
        points = " ".join(f"{r}:{100 * v:.1f}/{n:.1f}" for r, v, n in trace.points)
        print(f"{agg} {cond}: test {row['test_accuracy']:.4f} {row['status']} | {points}", flush=True)


if __name__ == "__main__":
    main()
