"""Where the attackers sit among the honest clients, round by round, as centered clipping measures distance.

``python -m experiments.cc_distances [--dataset digits] [--attacks alie,sign-flip] [--seed 1] [--rounds 150]
[--global-batch B] [--lr LR] [--weight-decay WD] [--ema 0.99] [--data-dir DIR]``

For each attack, one run of ``experiments.bench_byzantine`` with the default centered-clip
(n = 20, partitions 0..f-1 Byzantine). After every step, two distance ratios per client, each
its distance divided by the median distance of all clients:

- ``momenta``: |m_i - v|, the clients' momenta m_i around the previous aggregate v: what
  centered-clip clips and ``cc-drop-ratio`` drops.
- ``ema``: |e_i - c| for a longer history e_i = a e_i + (1 - a) (g_i + wd w), a = ``--ema``, around
  the coordinate-wise median c of the e_i, a center that the f attackers cannot pull alone.

Prints, at a few rounds, the attackers' ratios and the honest clients' median, 90th percentile
and maximum, and in how many rounds every attacker was farther than the farthest honest client:
the rounds in which a distance rule could tell them apart without hurting an honest client.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from experiments.bench_byzantine import CONDITIONS, add_run_args, run_config, run_one, run_setting
from strategies.robust import flatten
from strategies.server_state import ServerState

SHOWN = (2, 6, 21, 41, 81, 121)  # rounds printed, and the last one


def ratios(rows: torch.Tensor, center: torch.Tensor) -> np.ndarray:
    """|row_i - center| / median_i |row_i - center| for the rows of ``rows`` (K x D)."""
    d = (rows.to(torch.float64) - center.to(torch.float64)).norm(dim=1)
    return (d / d.median().clamp_min(1e-30)).numpy()


class Recorder:
    """``run_one``'s ``on_round``: both ratios of every client after every step (module docstring)."""

    def __init__(self, beta: float, ema: float):
        self.beta, self.ema = beta, ema
        self.long: dict[int, torch.Tensor] = {}
        self.rounds: list[dict[str, tuple[np.ndarray, np.ndarray]]] = []  # per round: view -> (partitions, ratios)

    def __call__(self, before: ServerState, after: ServerState) -> None:
        pids = sorted(p for p, m in after.client_momentum.items() if m is not before.client_momentum.get(p))  # replied
        m = {p: flatten(after.client_momentum[p]) for p in pids}
        history = None if before.velocity is None else flatten(before.velocity)
        for p in pids:
            prev = flatten(before.client_momentum[p]) if p in before.client_momentum else history
            g = m[p] if prev is None else m[p] - self.beta * prev  # g_i + wd w, as the server added it
            self.long[p] = self.ema * self.long.get(p, torch.zeros_like(g)) + (1 - self.ema) * g
        rows = torch.stack([m[p] for p in pids])
        center = torch.zeros(rows.shape[1]) if history is None else history
        longs = torch.stack([self.long[p] for p in pids])
        self.rounds.append({"momenta": (np.array(pids), ratios(rows, center)),
                            "ema": (np.array(pids), ratios(longs, longs.median(dim=0).values))})

    def report(self, view: str, f: int) -> list[str]:
        """Lines: per shown round the attackers' ratios and the honest quantiles; then the separable rounds."""
        lines, apart = [], 0
        for k, rec in enumerate(self.rounds, start=1):
            pids, r = rec[view]
            bad, honest = np.sort(r[pids < f]), r[pids >= f]
            apart += bool(len(bad)) and bad.min() > honest.max()
            if k in SHOWN or k == len(self.rounds):
                lines.append(f"  round {k:>3}: attackers {np.array2string(bad, precision=2)}  honest median "
                             f"{np.median(honest):.2f} p90 {np.quantile(honest, 0.9):.2f} max {honest.max():.2f}")
        lines.append(f"  every attacker beyond the farthest honest client in {apart} of {len(self.rounds)} rounds")
        return lines


def main(argv: list[str] | None = None) -> None:
    """Run each attack once and print both views."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(p, rounds=150)
    p.add_argument("--attacks", default="alie,sign-flip")
    p.add_argument("--ema", type=float, default=0.99, help="a of the long average, in [0, 1)")
    args = p.parse_args(argv)
    names = [a for a in args.attacks.split(",") if a]
    bad = [a for a in names if a not in CONDITIONS or CONDITIONS[a] == 0] or ([] if names else ["(empty)"])
    if bad:
        raise SystemExit(f"--attacks: {bad[0]!r} is not an attack; allowed: "
                         f"{', '.join(a for a, f in CONDITIONS.items() if f)}")
    if not 0 <= args.ema < 1:
        raise SystemExit(f"--ema = {args.ema}: must be in [0, 1)")
    scale, bench = run_setting(args)
    for attack in names:
        rec = Recorder(run_config(args.dataset, "centered-clip", attack, scale, args.seed).momentum, args.ema)
        row = run_one(bench, "centered-clip", attack, scale, on_round=rec)
        print(f"{args.dataset} seed {args.seed}, {attack} (f = {CONDITIONS[attack]}), default centered-clip: "
              f"test {row['test_accuracy']:.4f}, {row['status']}", flush=True)
        print(" momenta around the previous aggregate (what centered-clip sees):")
        print("\n".join(rec.report("momenta", CONDITIONS[attack])))
        print(f" averages over about {1 / (1 - args.ema):.0f} rounds (a = {args.ema:g}) around their coordinate-wise median:")
        print("\n".join(rec.report("ema", CONDITIONS[attack])), flush=True)


if __name__ == "__main__":
    main()
