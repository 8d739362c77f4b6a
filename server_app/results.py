"""The results folder of a run, and its checkpoint: the one place that owns their format.

Files (all written atomically: a temporary file, then a rename; mode 0644):

- ``config.json``: the run config, the model name and its parameter count;
- ``rounds.csv``: one row per round (round 0 is the initial model);
- ``clients.csv``: one row per valid client reply;
- ``failures.csv``: one row per failed, invalid or late client (``round, node_id,
  partition_id, local_batch, reason``);
- ``batch_plan.json``: what an adaptive batch policy probed and chose;
- ``privacy.json``: client-level DP only: its settings, Opacus' history and the final epsilon;
- ``checkpoint.pt``: everything needed to continue, one ``ServerState`` (``RunResults.save_checkpoint``);
- ``model.pt``: the final ``state_dict``.

``RunResults`` is the strategy's ``RoundSink``: the strategy hands it each round's training
record, the ServerApp adds the evaluation and commits the row.

rounds.csv and clients.csv are rewritten whole, so a write costs time in proportion to the
rows so far: rewriting them after every round would make a run of thousands of rounds
quadratic (0.7 s a round at round 6,000 of a CIFAR-10 run with 8 clients). They are rewritten
at every checkpoint round and after the last round (so a resumed run finds every row it keeps),
by ``flush`` when a run stops early, and otherwise whenever the time since the last write is at
least ``WRITE_EVERY_COST`` times what that write took: every round while the files are small,
at most a twentieth of the run's time later.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workloads.config import RunConfig
from workloads.errors import ConfigError
from workloads.files import atomic_torch_save, atomic_write_json, atomic_write_text, remove_stale_temporaries

if TYPE_CHECKING:
    from strategies.server_state import ServerState

ROUND_COLUMNS = [
    "round", "global_batch", "planned_batch", "failed_clients", "skipped", "samples_seen", "lr", "train_loss",
    "val_loss", "val_accuracy", "test_loss", "test_accuracy", "wall_s",
]
CLIENT_COLUMNS = ["round", "node_id", "partition_id"]
FAILURE_COLUMNS = ["round", "node_id", "partition_id", "local_batch", "reason"]
CHECKPOINT_FORMAT = 1
WRITE_EVERY_COST = 20.0  # rewrite the CSVs once the time since the last write is this many times its cost
# Keys a resumed run may change: they decide how faults are handled and where files are, not what is computed.
RESUMABLE_KEYS = frozenset({"resume", "min-batch-fraction", "round-timeout-s", "max-norm-ratio", "round-retries",
                            "max-failed-rounds", "checkpoint-every", "out-dir", "data-dir"})


def resolve_out_dir(out_dir: str, cfg: RunConfig) -> Path:
    """Return the results folder: ``out-dir``, or ``./results/<time>-<dataset>-<model>-s<seed>``."""
    if out_dir:
        return Path(out_dir).expanduser().resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results").resolve() / f"{stamp}-{cfg.dataset}-{cfg.model}-s{cfg.seed}"


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` already holds a run's results."""
    return (out_dir / "rounds.csv").exists() or (out_dir / "checkpoint.pt").exists()


def _csv_text(rows: list[dict[str, Any]], first: list[str]) -> str:
    return _CsvText(first).text(rows)


class _CsvText:
    """The CSV text of a list of rows that only grows, each row formatted once.

    Rows must not change once added (``RunResults`` appends committed rows). Columns are
    ``first`` then every other key in order of appearance; a new key re-formats every row.
    """

    def __init__(self, first: list[str]) -> None:
        self.first = list(first)
        self._reset(None)

    def _reset(self, rows: list[dict[str, Any]] | None) -> None:
        self._rows, self._columns, self._chunks, self._count = rows, list(self.first), [], 0

    def text(self, rows: list[dict[str, Any]]) -> str:
        """The whole file for ``rows`` (formats only the rows added since the last call)."""
        if rows is not self._rows or len(rows) < self._count:
            self._reset(rows)
        new = rows[self._count:]
        added = list(dict.fromkeys(k for row in new for k in row if k not in self._columns))
        if added:
            columns = self._columns + added
            self._reset(rows)
            self._columns, new = columns, rows
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._columns, restval="", lineterminator="\n")
        for row in new:
            writer.writerow({k: _fmt(v) for k, v in row.items()})
        self._chunks.append(buf.getvalue())
        self._count = len(rows)
        header = io.StringIO()
        csv.writer(header, lineterminator="\n").writerow(self._columns)
        return header.getvalue() + "".join(self._chunks)


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RunResults:
    """Writes (and, on resume, reloads) one run's results folder.

    Parameters
    ----------
    out_dir : Path
        The results folder.
    cfg : RunConfig
        The run config (``config.json``).
    extra : dict, optional
        More entries for ``config.json`` (model name, parameter count).

    Raises
    ------
    ConfigError
        If ``out_dir`` already holds a run and ``cfg.resume`` is false: nothing is overwritten.
    """

    def __init__(self, out_dir: Path, cfg: RunConfig, extra: dict[str, Any] | None = None) -> None:
        if holds_run(out_dir) and not cfg.resume:
            raise ConfigError(
                f"run-config key 'out-dir' = '{out_dir}' already holds a run (rounds.csv or checkpoint.pt). "
                "Allowed: a new folder, or resume=true (python -m flb.launch --resume DIR) to continue it."
            )
        self.out_dir, self.cfg = out_dir, cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            remove_stale_temporaries(self.out_dir)  # a write the kill interrupted; its file is intact
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []
        self._texts = {"rounds.csv": _CsvText(ROUND_COLUMNS), "clients.csv": _CsvText(CLIENT_COLUMNS)}
        self.failure_rows: list[dict[str, Any]] = []
        self._pending: tuple[dict[str, Any], list[dict[str, Any]]] | None = None
        self._last_write_end, self._last_write_s = 0.0, 0.0  # perf_counter seconds
        atomic_write_json(self.out_dir / "config.json", {"run_config": cfg.to_mapping(), **(extra or {})})

    # RoundSink ------------------------------------------------------------------
    def train(self, row: dict[str, Any], clients: list[dict[str, Any]]) -> None:
        """Hold a round's training record until ``finish_round`` adds its evaluation."""
        self._pending = (row, clients)

    def failures(self, rows: list[dict[str, Any]]) -> None:
        """Append failed clients to failures.csv at once (before a failing round stops the run)."""
        self.failure_rows += rows
        atomic_write_text(self.out_dir / "failures.csv", _csv_text(self.failure_rows, FAILURE_COLUMNS))

    def plan(self, batch_plan: dict[str, Any]) -> None:
        """Write batch_plan.json."""
        atomic_write_json(self.out_dir / "batch_plan.json", batch_plan)

    def privacy(self, summary: dict[str, Any]) -> None:
        """Write privacy.json (``strategies.privacy.privacy_summary``)."""
        atomic_write_json(self.out_dir / "privacy.json", summary)

    # rounds ---------------------------------------------------------------------
    def finish_round(self, rnd: int, evaluation: dict[str, float], wall_s: float) -> dict[str, Any]:
        """Commit round ``rnd`` (its training record, ``evaluation`` and ``wall_s``); rewrite the CSVs."""
        row: dict[str, Any] = {"round": rnd, "global_batch": 0, "samples_seen": 0, "lr": 0.0}
        clients: list[dict[str, Any]] = []
        if rnd > 0 and self._pending is not None:
            train, clients = self._pending
            row |= train
        self._pending = None
        row |= evaluation
        row["wall_s"] = wall_s
        self.rounds.append(row)
        self.clients += clients
        every = self.cfg.checkpoint_every
        due = (rnd == self.cfg.num_server_rounds or (every and rnd % every == 0)
               or time.perf_counter() - self._last_write_end >= WRITE_EVERY_COST * self._last_write_s)
        if due:
            self.flush()
        return row

    def flush(self) -> None:
        """Rewrite rounds.csv and clients.csv with every committed row."""
        start = time.perf_counter()
        atomic_write_text(self.out_dir / "rounds.csv", self._texts["rounds.csv"].text(self.rounds))
        if self.clients:
            atomic_write_text(self.out_dir / "clients.csv", self._texts["clients.csv"].text(self.clients))
        self._last_write_end = time.perf_counter()
        self._last_write_s = self._last_write_end - start

    def keep_through(self, rnd: int) -> None:
        """Resume: reload the CSVs on disk, keeping only rows of rounds <= ``rnd`` (-1 keeps none)."""
        def keep(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [r for r in rows if int(r["round"]) <= rnd]

        self.rounds = keep(_read_csv(self.out_dir / "rounds.csv"))
        self.clients = keep(_read_csv(self.out_dir / "clients.csv"))
        self.failure_rows = keep(_read_csv(self.out_dir / "failures.csv"))
        for name, rows, first in (("rounds.csv", self.rounds, ROUND_COLUMNS), ("clients.csv", self.clients, CLIENT_COLUMNS),
                                  ("failures.csv", self.failure_rows, FAILURE_COLUMNS)):
            path = self.out_dir / name
            if rows or path.exists():
                atomic_write_text(path, _csv_text(rows, first))

    # checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, state: ServerState, wall_s: float) -> Path:
        """Write checkpoint.pt: the server's state (``ServerState.to_dict``), the wall clock and the config.

        ``round`` (the rounds completed) is also stored beside the state, where format 1 had it.
        """
        path = self.out_dir / "checkpoint.pt"
        atomic_torch_save(path, {"format": CHECKPOINT_FORMAT, "round": state.round, "wall_s": wall_s,
                                 "run_config": self.cfg.to_mapping(), "strategy": state.to_dict()})
        return path

    def load_checkpoint(self) -> tuple[ServerState, float] | None:
        """Read checkpoint.pt: its ``ServerState`` and wall clock (None if there is none).

        A checkpoint written before the state held its round number gets it from beside the state.

        Raises
        ------
        ConfigError
            If a key other than ``RESUMABLE_KEYS`` differs from the checkpoint's run config.
        """
        path = self.out_dir / "checkpoint.pt"
        if not path.exists():
            return None
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{path}: checkpoint format {ckpt.get('format')!r}; this version reads {CHECKPOINT_FORMAT}.")
        now = self.cfg.to_mapping()
        for key, then in ckpt["run_config"].items():
            if key not in RESUMABLE_KEYS and now.get(key) != then:
                raise ConfigError(
                    f"run-config key '{key}' = {now.get(key)!r}, but the checkpoint in {self.out_dir} was written "
                    f"with {then!r}. Allowed on resume: the same value (only {', '.join(sorted(RESUMABLE_KEYS))} may change)."
                )
        from strategies.server_state import ServerState

        return ServerState.from_dict({"round": ckpt["round"], **ckpt["strategy"]}), float(ckpt["wall_s"])

    def save_model(self, state: dict[str, torch.Tensor]) -> Path:
        """Save the final ``state_dict`` as model.pt."""
        path = self.out_dir / "model.pt"
        atomic_torch_save(path, {k: v.detach().cpu() for k, v in state.items()})
        return path
