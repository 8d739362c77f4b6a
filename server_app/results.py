"""Results of a run: config.json, rounds.csv, clients.csv and the final model, all atomic.

``rounds.csv`` and ``clients.csv`` are rewritten whole (through a temporary file and a
rename) after every round, so a reader or a crash never sees a torn row.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import torch

from workloads.config import RunConfig
from workloads.files import atomic_torch_save, atomic_write_json, atomic_write_text

ROUND_COLUMNS = [
    "round", "global_batch", "samples_seen", "lr", "train_loss", "val_loss", "val_accuracy",
    "test_loss", "test_accuracy", "wall_s",
]


def resolve_out_dir(out_dir: str, cfg: RunConfig) -> Path:
    """Return the results folder: ``out-dir``, or ``./results/<time>-<dataset>-<model>``."""
    if out_dir:
        return Path(out_dir).expanduser().resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results").resolve() / f"{stamp}-{cfg.dataset}-{cfg.model}-s{cfg.seed}"


def _csv_text(rows: list[dict[str, Any]], first: list[str]) -> str:
    columns = list(first)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    return buf.getvalue()


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


class ResultsWriter:
    """Writes a run's outputs into one folder."""

    def __init__(self, out_dir: Path, cfg: RunConfig, extra: dict[str, Any] | None = None) -> None:
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = []
        atomic_write_json(self.out_dir / "config.json", {"run_config": cfg.to_mapping(), **(extra or {})})

    def add_round(self, row: dict[str, Any], client_rows: list[dict[str, Any]]) -> None:
        """Append one round's row and rewrite rounds.csv and clients.csv."""
        self.rounds.append(row)
        atomic_write_text(self.out_dir / "rounds.csv", _csv_text(self.rounds, ROUND_COLUMNS))
        if client_rows:
            atomic_write_text(self.out_dir / "clients.csv", _csv_text(client_rows, ["round", "node_id"]))

    def write_json(self, name: str, obj: Any) -> None:
        """Write ``obj`` as ``name`` in the results folder, atomically."""
        atomic_write_json(self.out_dir / name, obj)

    def save_model(self, state: dict[str, torch.Tensor]) -> Path:
        """Save the final ``state_dict`` as model.pt."""
        path = self.out_dir / "model.pt"
        atomic_torch_save(path, {k: v.detach().cpu() for k, v in state.items()})
        return path
