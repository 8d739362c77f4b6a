"""Shared by the resume tests: crash a run in one round, resume it, compare it with the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client_app.app import app as client_app
from experiments.faults import Fault, FaultyClientApp
from flb.inprocess import run_inprocess
from strategies.large_batch import RoundFailure


def crash_then_resume(config: dict, folder: Path, crash_round: int, checkpoint_round: int,
                      num_clients: int = 4) -> tuple[Path, Path]:
    """Run ``config`` in ``folder/a``; in ``folder/b`` every client crashes in ``crash_round``, then resume it.

    ``config`` must stop at the first short round (``max-failed-rounds = 0``); the crashed run's
    checkpoint must be ``checkpoint_round``'s. Returns the two results folders.
    """
    run_inprocess(config | {"out-dir": str(folder / "a")}, num_clients=num_clients)
    crash = FaultyClientApp(client_app, lambda r, p: Fault("crash") if r == crash_round else None)
    with pytest.raises(RoundFailure):
        run_inprocess(config | {"out-dir": str(folder / "b")}, num_clients=num_clients, client_app=crash)
    assert torch.load(folder / "b" / "checkpoint.pt")["round"] == checkpoint_round
    run_inprocess(config | {"out-dir": str(folder / "b"), "resume": True}, num_clients=num_clients)
    return folder / "a", folder / "b"


def max_model_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two results folders' final models."""
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return max(float((ma[k] - mb[k]).abs().max()) for k in ma)
