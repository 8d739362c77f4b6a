"""Run experiments from Python: one run, or a sweep over configs and seeds, cached by config.

>>> import flb
>>> r = flb.run({"teacher": "adascale", "num-server-rounds": 20})     # in-process, 8 clients
>>> r.rounds[["round", "train_loss", "test_accuracy"]].tail(1)
>>> s = flb.sweep({"teacher": ["none", "adascale"]}, seeds=[1, 2, 3], base={"num-server-rounds": 20})
>>> flb.summarize(s.rounds(), by="teacher")

Every run goes through the launcher's pre-flight checks (server_app/preflight.py), writes the
usual results folder, and is cached: its folder is named by a digest of its full config, the
number of clients and the engine, and a finished folder is read back instead of trained again.
A folder left by an interrupted run continues from its checkpoint (or starts again, if the run
stopped before its first one).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from workloads.files import atomic_write_json

ENGINES = ("inprocess", "ray")
TRAINING_FAILURES = (RuntimeError,)  # RoundFailure, DivergenceError and a failed flwr run are RuntimeErrors
ROUND_LINE = re.compile(r"\[round (\d+)/(\d+)\]")  # the ServerApp's line per round
RUNS_DIR = Path("results") / "runs"  # default home of cached runs, relative to the working directory


@dataclass
class Run:
    """A finished run: its folder, its config, and its results as DataFrames."""

    folder: Path
    config: dict[str, Any] = field(repr=False)  # the full kebab-case run config (config.json)
    model: str = ""
    cached: bool = False  # read back from an earlier run instead of trained
    error: str = ""  # why training stopped (a round that failed, a divergent step); "" = it finished

    @classmethod
    def load(cls, folder: str | Path, cached: bool = False) -> Run:
        """Read a results folder (with ``error.json``, a run that stopped early)."""
        folder = Path(folder)
        meta = json.loads((folder / "config.json").read_text())
        error = json.loads((folder / "error.json").read_text())["error"] if (folder / "error.json").exists() else ""
        return cls(folder, meta["run_config"], meta.get("model", ""), cached, error)

    @cached_property
    def rounds(self) -> pd.DataFrame:
        """rounds.csv: one row per round (round 0: the initial model)."""
        return pd.read_csv(self.folder / "rounds.csv")

    @cached_property
    def clients(self) -> pd.DataFrame:
        """clients.csv: one row per valid client reply per round."""
        return _csv_or_empty(self.folder / "clients.csv")

    @cached_property
    def failures(self) -> pd.DataFrame:
        """failures.csv: one row per failed, invalid or late client (empty if none failed)."""
        return _csv_or_empty(self.folder / "failures.csv")

    @property
    def final(self) -> dict[str, float]:
        """The last round's row."""
        return self.rounds.iloc[-1].to_dict()

    def __repr__(self) -> str:
        c, f = self.config, self.final
        return (f"Run({str(self.folder)!r}, teacher={c['teacher']}, B={c['global-batch-size']}, seed={c['seed']}, "
                f"rounds={int(f['round'])}, test_accuracy={f.get('test_accuracy', float('nan')):.4f}"
                f"{', cached' if self.cached else ''}{', FAILED: ' + self.error[:80] if self.error else ''})")


def _csv_or_empty(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def full_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The complete, checked run config (pyproject defaults + ``config``) as a kebab-case dict."""
    from flb.launch.run import project_defaults
    from server_app.preflight import parse_run_config

    return parse_run_config(project_defaults() | dict(config or {})).to_mapping()


def run_key(config: Mapping[str, Any], clients: int, engine: str) -> str:
    """A digest of everything that decides a run's results (not where they are written)."""
    relevant = {k: v for k, v in config.items() if k not in ("out-dir", "resume")}
    text = json.dumps({"config": relevant, "clients": clients, "engine": engine}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _same_run(folder: Path, config: Mapping[str, Any]) -> bool:
    """Whether ``folder`` holds a run (finished or not) of this config."""
    if not (folder / "config.json").exists():
        return False
    saved = json.loads((folder / "config.json").read_text())["run_config"]
    defaults = _defaults()  # a key added after the run was saved: the run had its default behaviour
    return all(saved.get(k, defaults.get(k)) == v for k, v in config.items() if k not in ("out-dir", "resume", "data-dir"))


def _finished(folder: Path, config: Mapping[str, Any]) -> bool:
    """Whether ``folder`` holds this config's run, finished or stopped by a training failure (``error.json``)."""
    done = (folder / "model.pt").exists() or (folder / "error.json").exists()
    if not done or not _same_run(folder, config):
        return False
    return (folder / "error.json").exists() or int(pd.read_csv(folder / "rounds.csv")["round"].iloc[-1]) == int(config["num-server-rounds"])


def _defaults() -> dict[str, Any]:
    from workloads.config import RunConfig

    return RunConfig.defaults()


def run(config: Mapping[str, Any] | None = None, *, clients: int = 8, engine: str = "inprocess",
        out: str | Path | None = None, progress: bool = True, force: bool = False, client_app=None,
        federation: str = "", on_error: str = "raise") -> Run:
    """Train one configuration (or read it back if it ran before) and return it.

    Parameters
    ----------
    config : mapping, optional
        Kebab-case run-config overrides, e.g. ``{"teacher": "adascale", "lr": 0.1}``.
    clients : int
        Number of (virtual) nodes; node i holds partition i.
    engine : {"inprocess", "ray"}
        ``inprocess``: the real ServerApp and ClientApp in this process (fast, no Ray);
        ``ray``: a real ``flwr run`` on Flower's Ray engine through the launcher.
    out : path, optional
        The results folder (default ``results/runs/<dataset>-<teacher>-B<B>-s<seed>-<digest>``).
    progress : bool
        A progress bar over the rounds; Flower's own log lines are kept out of the way.
    force : bool
        Train again even if a finished run with this config is in ``out``.
    client_app : callable, optional
        In-process only: what answers the messages instead of the ClientApp (fault injection,
        ``experiments.faults.FaultyClientApp``).
    federation : str
        Ray only: extra ``--federation-config`` pairs.
    on_error : {"raise", "record"}
        When training stops early (a round without enough valid replies, a step that would make
        the model non-finite, a failed ``flwr run``): raise, or return the ``Run`` with its
        ``error`` set (and remember it, as a finished run is remembered). Learning-rate sweeps
        want ``"record"``: a divergent rate is a result, not a crash.

    Raises
    ------
    ConfigError
        Before anything runs, naming the key, the value and what is allowed.
    """
    _check_run_args(engine, on_error, clients)
    cfg = full_config(config)
    key = run_key(cfg, clients, engine)
    folder = Path(out) if out else RUNS_DIR / f"{cfg['dataset']}-{cfg['teacher']}-B{cfg['global-batch-size']}-s{cfg['seed']}-{key}"
    folder = folder.expanduser().resolve()
    if not force and _finished(folder, cfg):
        return Run.load(folder, cached=True)
    cfg = cfg | {"out-dir": str(folder), "resume": _prepare_folder(folder, cfg, force, explicit=out is not None)}
    with round_progress(cfg["num-server-rounds"], progress, f"{cfg['teacher']} B={cfg['global-batch-size']} s{cfg['seed']}") as advance:
        try:
            if engine == "inprocess":
                from flb.inprocess import run_inprocess

                run_inprocess(cfg, clients, client_app=client_app)
            else:
                _run_ray(cfg, clients, federation, advance)
        except TRAINING_FAILURES as err:
            if on_error == "raise" or not (folder / "config.json").exists():
                raise
            atomic_write_json(folder / "error.json", {"error": f"{type(err).__name__}: {err}"})
    return Run.load(folder)


def _check_run_args(engine: str, on_error: str, clients: int) -> None:
    from workloads.errors import ConfigError

    if engine not in ENGINES:
        raise ConfigError(f"engine = {engine!r} is not allowed. Allowed: {', '.join(ENGINES)}.")
    if on_error not in ("raise", "record"):
        raise ConfigError(f"on_error = {on_error!r} is not allowed. Allowed: raise, record.")
    if clients < 1:
        raise ConfigError(f"clients = {clients}: must be >= 1.")


def _prepare_folder(folder: Path, cfg: dict[str, Any], force: bool, explicit: bool) -> bool:
    """Whether the run resumes from ``folder``'s checkpoint; otherwise empty the folder (refusing a foreign run)."""
    from workloads.errors import ConfigError

    resume = (folder / "checkpoint.pt").exists() and not force
    if folder.exists() and not resume:  # this config's run stopped before its first checkpoint starts again
        if (folder / "rounds.csv").exists() and not force and explicit and not (folder / "error.json").exists() \
                and not _same_run(folder, cfg):
            raise ConfigError(f"out = '{folder}' holds a different run. Allowed: another folder, or force=True to replace it.")
        shutil.rmtree(folder)
    return resume


def _run_ray(cfg: dict[str, Any], clients: int, federation: str, advance) -> None:
    from flb.launch.run import launch, parse_federation
    from server_app.preflight import preflight
    from workloads.config import RunConfig

    fed = parse_federation(f"num-supernodes={clients} {federation}")
    config = RunConfig.from_mapping(cfg)
    preflight(config, clients, fed["client-resources-num-cpus"])
    def on_line(line: str) -> None:
        if (m := ROUND_LINE.search(line)) is not None:
            advance(int(m.group(1)))

    if launch(config, fed, Path(cfg["out-dir"]), quiet=True, on_line=on_line) != 0:
        raise RuntimeError(f"the flwr run failed; see {cfg['out-dir']}/run.log")


@dataclass
class Sweep:
    """The runs of a sweep, in grid order."""

    runs: list[Run]

    def rounds(self, include_failed: bool = False) -> pd.DataFrame:
        """Every run's rounds.csv with its config as columns (``flb.load``); runs that stopped early left out."""
        from flb.analysis import load

        return load([r.folder for r in self.runs if include_failed or not r.error])

    @property
    def failed(self) -> list[Run]:
        """The runs that stopped early (``Run.error``)."""
        return [r for r in self.runs if r.error]

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)


def expand(grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]], seeds: Sequence[int],
           base: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The configs of a sweep: ``base`` updated by every point of ``grid``, for every seed.

    ``grid`` is either a mapping of key -> values (their Cartesian product) or a list of
    mappings (explicit points, e.g. each method with its own learning rate).
    """
    if isinstance(grid, Mapping):
        keys = list(grid)
        points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    else:
        points = [dict(p) for p in grid]
    return [dict(base or {}) | p | {"seed": s} for p in points for s in seeds]


def sweep(grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]], *, seeds: Sequence[int] = (1, 2, 3),
          base: Mapping[str, Any] | None = None, clients: int = 8, engine: str = "inprocess",
          out: str | Path | None = None, progress: bool = True, on_error: str = "raise") -> Sweep:
    """Run every config of ``expand(grid, seeds, base)`` (finished ones are read back at once).

    Every config is checked before the first run starts. ``out`` (default ``results/runs``)
    holds one folder per run, named by its config's digest. ``on_error="record"`` keeps going
    past runs that stop early (their ``Run.error`` says why), as ``run`` does.
    """
    configs = expand(grid, seeds, base)
    checked = [full_config(c) for c in configs]  # bad input stops here, before any training
    root = Path(out) if out else RUNS_DIR
    runs = []
    bar = _tqdm(total=len(configs), desc="runs", disable=not progress)
    for config, cfg in zip(configs, checked):
        name = f"{cfg['dataset']}-{cfg['teacher']}-B{cfg['global-batch-size']}-s{cfg['seed']}-{run_key(cfg, clients, engine)}"
        runs.append(run(config, clients=clients, engine=engine, out=root / name, progress=progress, on_error=on_error))
        bar.update(1)
    bar.close()
    return Sweep(runs)


def _tqdm(**kwargs):
    """tqdm's notebook widget where ipywidgets is installed, else its text bar (no warning)."""
    try:
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm.std import tqdm
    return tqdm(**kwargs)


class _RoundHandler(logging.Handler):
    """Advances a progress bar on the ServerApp's ``[round k/N]`` log line."""

    def __init__(self, bar) -> None:
        super().__init__(logging.INFO)
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("[round ") and record.args:
            self.bar.update(max(0, int(record.args[0]) - self.bar.n))


@contextmanager
def round_progress(total: int, show: bool, desc: str) -> Iterator[Callable[[int], None]]:
    """During the block: Flower's console output at WARNING only, and a progress bar over rounds.

    Yields ``advance(rounds_done)`` for runs whose log lines arrive from another process.
    """
    import flwr.common.logger  # noqa: F401 - Flower attaches its console handler on import: silence it too

    logger = logging.getLogger("flwr")
    saved = [(h, h.level) for h in logger.handlers]
    for handler, _ in saved:
        handler.setLevel(logging.WARNING)
    bar = _tqdm(total=total, desc=desc, disable=not show, leave=False)
    handler = _RoundHandler(bar)
    logger.addHandler(handler)
    try:
        yield lambda done: bar.update(max(0, done - bar.n))
    finally:
        logger.removeHandler(handler)
        bar.close()
        for h, level in saved:
            h.setLevel(level)
