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

import torch

from experiments.bench_byzantine import CONDITIONS, Bench, add_run_args, run_one, run_setting, val_accuracy
from strategies.server_state import ServerState
from workloads.config import AGGREGATORS


def model_norm(state: dict[str, torch.Tensor]) -> float:
    """|w|: sqrt(sum of squares) over the floating-point entries of a state dict, in float64."""
    return sum(float((v.to(torch.float64) ** 2).sum()) for v in state.values() if v.is_floating_point()) ** 0.5


class Trace:
    """``run_one``'s ``on_round``: (round, validation accuracy, |w|) every ``every`` rounds and at ``last``."""

    def __init__(self, bench: Bench, every: int, last: int, val_examples: int = 0):
        self.bench, self.every, self.last, self.val_examples = bench, every, last, val_examples
        self.points: list[tuple[int, float, float]] = []

    def __call__(self, before: ServerState, after: ServerState) -> None:
        if after.round % self.every and after.round != self.last:
            return
        val = val_accuracy(self.bench, after.model, self.val_examples)
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
    add_run_args(p, rounds=400)
    p.add_argument("--runs", default="mean:alie,centered-clip:alie,mean:clean")
    p.add_argument("--every", type=int, default=25, help="rounds between two points (>= 1)")
    args = p.parse_args(argv)
    runs = parse_runs(args.runs)
    if args.every < 1 or args.rounds < 1:
        raise SystemExit(f"--every = {args.every}, --rounds = {args.rounds}: both must be >= 1")
    scale, bench = run_setting(args)
    wd = "default" if scale.weight_decay is None else f"{scale.weight_decay:g}"
    print(f"{args.dataset} seed {args.seed}, {scale.rounds} rounds, B = {scale.global_batch}, lr {scale.lr:g}, "
          f"weight decay {wd}; round:val%/|w|", flush=True)
    for agg, cond in runs:
        trace = Trace(bench, args.every, scale.rounds, scale.val_examples)
        row = run_one(bench, agg, cond, scale, on_round=trace)
        points = " ".join(f"{r}:{100 * v:.1f}/{n:.1f}" for r, v, n in trace.points)
        print(f"{agg} {cond}: test {row['test_accuracy']:.4f} {row['status']} | {points}", flush=True)


if __name__ == "__main__":
    main()
