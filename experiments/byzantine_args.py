"""The byzantine benchmark's settings: each dataset's run length, and the command-line options that override it.

Shared by ``bench_byzantine`` and the studies that run its grid (``cc_radius``, ``cc_distances``, ``byz_trace``);
every bad value exits with its option, its value and what is allowed.
"""

from __future__ import annotations

import argparse
from collections.abc import Container
from dataclasses import dataclass

from experiments.attacks import CONDITIONS, N_CLIENTS
from workloads.config import AGGREGATORS


@dataclass(frozen=True)
class Scale:
    """A dataset's run length: rounds, global batch B (b_i = B / 20), peak lr, validation examples evaluated,
    the server's L2 coefficient, centered-clip's drop ratio and the momentum (None = run-config
    ``weight-decay``'s, ``cc-drop-ratio``'s, ``momentum``'s default)."""

    rounds: int
    global_batch: int
    lr: float
    val_examples: int = 0  # 0 = the whole validation split
    weight_decay: float | None = None
    cc_drop_ratio: float | None = None
    momentum: float | None = None
    exclude_ratio: float | None = None  # robust aggregators' exclude-ratio (None = run-config default)


# digits: the run-config defaults (lr 0.3). MNIST CNN: lr 0.3 stays at chance and 0.07 or more spikes; 0.04 had
# the best validation accuracy of 0.03-0.07 at 40 rounds (docs/byzantine.md#byzantine-clients). 40 rounds of
# B = 160 keep a run near half a minute with 1 thread: the robust aggregators sort 20 x 390k entries a round.
# CIFAR-10 CNN (only when named): 200 rounds (0.7 epoch); lr 0.08 had the best validation accuracy, mean of
# seeds 1-3, of 0.04-0.16 for the clean mean run (0.16 leads on seed 1 and falls to 41 % on seed 3; 0.32
# diverges) (docs/byzantine.md#cifar-10).
SCALES = {"digits": Scale(60, 320, 0.3), "mnist": Scale(40, 160, 0.04, 2000), "cifar10": Scale(200, 160, 0.08, 2000)}


def add_weight_decay_arg(p: argparse.ArgumentParser) -> None:
    """``--weight-decay`` (``checked_weight_decay`` checks it): the server L2 coefficient of every run."""
    p.add_argument("--weight-decay", type=float, default=None,
                   help="server L2 coefficient of every run, in [0, 1); default: run-config weight-decay's")


def add_ratio_args(p: argparse.ArgumentParser) -> None:
    """``--cc-drop-ratio`` and ``--exclude-ratio`` (``overridden`` checks them): 0 (off) or > 1, None = run-config's."""
    p.add_argument("--cc-drop-ratio", type=float, default=None,
                   help="centered-clip's cc-drop-ratio of every run, 0 (off) or > 1; default: run-config's")
    p.add_argument("--exclude-ratio", type=float, default=None,
                   help="robust aggregators' exclude-ratio of every run, 0 (off) or > 1; default: run-config's")


def add_momentum_arg(p: argparse.ArgumentParser) -> None:
    """``--momentum`` (``overridden`` checks it): the server SGD momentum, centered-clip's worker momentum."""
    p.add_argument("--momentum", type=float, default=None,
                   help="server SGD momentum of every run (centered-clip's worker momentum), in [0, 1); "
                        "default: run-config's")


def checked_weight_decay(weight_decay: float | None) -> float | None:
    """``--weight-decay`` as given (None = run-config default); a value outside [0, 1) exits, named."""
    if weight_decay is not None and not 0 <= weight_decay < 1:
        raise SystemExit(f"--weight-decay = {weight_decay}: must be in [0, 1)")
    return weight_decay


def overridden(base: Scale, rounds: int = 0, global_batch: int = 0, lr: float = 0.0,
               weight_decay: float | None = None, cc_drop_ratio: float | None = None,
               momentum: float | None = None, exclude_ratio: float | None = None) -> Scale:
    """``base`` with the rounds, B, lr (0 keeps ``base``'s), weight decay, drop ratio, momentum and exclude ratio
    (None keeps them) given on the command line; a bad B, weight decay, ratio or momentum exits, named."""
    if global_batch < 0 or global_batch % N_CLIENTS:
        raise SystemExit(f"--global-batch = {global_batch}: must be 0 (the dataset's) or a positive multiple "
                         f"of {N_CLIENTS}, the number of clients")
    if cc_drop_ratio is not None and cc_drop_ratio != 0 and not cc_drop_ratio > 1:
        raise SystemExit(f"--cc-drop-ratio = {cc_drop_ratio}: must be 0 (off) or > 1")
    if exclude_ratio is not None and exclude_ratio != 0 and not exclude_ratio > 1:
        raise SystemExit(f"--exclude-ratio = {exclude_ratio}: must be 0 (off) or > 1")
    if momentum is not None and not 0 <= momentum < 1:
        raise SystemExit(f"--momentum = {momentum}: must be in [0, 1)")
    wd = base.weight_decay if checked_weight_decay(weight_decay) is None else weight_decay
    drop = base.cc_drop_ratio if cc_drop_ratio is None else cc_drop_ratio
    mom = base.momentum if momentum is None else momentum
    exclude = base.exclude_ratio if exclude_ratio is None else exclude_ratio
    return Scale(rounds or base.rounds, global_batch or base.global_batch, lr or base.lr, base.val_examples, wd, drop,
                 mom, exclude)


def first_unknown(names: list[str], allowed: Container[str]) -> str | None:
    """The first of ``names`` not in ``allowed``, ``"(empty)"`` when there are none, else None."""
    return next((n for n in names if n not in allowed), None if names else "(empty)")


def grid_runs(aggregators: str, attack_names: str) -> list[tuple[str, str]]:
    """The (aggregator, attack) pairs of two comma-separated lists; an unknown name raises ``ValueError``."""
    aggs, atts = [a for a in aggregators.split(",") if a], [a for a in attack_names.split(",") if a]
    for key, names, allowed in (("--aggregators", aggs, AGGREGATORS), ("--attacks", atts, tuple(CONDITIONS))):
        if (bad := first_unknown(names, allowed)) is not None:
            raise ValueError(f"{key} = {','.join(names) or repr('')}: {bad!r} is not one of {', '.join(allowed)}")
    return [(agg, attack) for attack in atts for agg in aggs]
