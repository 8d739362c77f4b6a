"""Launch one simulation safely: ``python -m flb.launch [--run-config ...] [--out DIR]``.

1. Parses the run config (pyproject defaults + ``--run-config``) and the federation config,
   and checks them, the data and the partition sizes before anything starts. Bad input exits
   with status 2 and a message naming the key, the value and what is allowed.
2. Starts a private SuperLink (flb/launch/superlink.py), submits the app, streams its log.
3. Judges the run by its final status, always stops the SuperLink, and prints the results
   folder as its last line. Exit status 0 only for ``finished:completed``.

``--run-config`` takes Flower's ``key=value`` syntax; unquoted words are taken as strings,
so ``dataset=cifar10`` works as well as ``dataset="cifar10"``. A ``.toml`` file works too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import tomllib
from pathlib import Path
from collections.abc import Callable
from typing import Any

import tomli_w

from flb.launch.superlink import REPO_ROOT, LocalSuperLink
from workloads.config import RunConfig
from workloads.errors import ConfigError
from workloads.files import atomic_write_json, atomic_write_text

DEFAULT_FEDERATION = {"num-supernodes": 8, "client-resources-num-cpus": 1}
FEDERATION_KEYS = {
    "num-supernodes": int, "client-resources-num-cpus": int, "client-resources-num-gpus": float,
    "backend": str, "verbose": bool, "init-args-num-cpus": int, "init-args-num-gpus": int,
    "init-args-logging-level": str, "init-args-log-to-driver": bool,
}
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def parse_pairs(text: str) -> dict[str, Any]:
    """Parse ``k=v k2="s"`` with TOML values; an unparsable bare value is a string."""
    out: dict[str, Any] = {}
    if text.strip().endswith(".toml") and "=" not in text:
        with open(Path(text.strip()).expanduser(), "rb") as f:
            return tomllib.load(f)
    rest = _PAIR.sub("", text).strip()
    if rest:
        raise ConfigError(f"could not parse {rest!r}: use key=value pairs separated by spaces.")
    for key, raw in _PAIR.findall(text):
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw.strip("'\"")
    return out


def project_defaults() -> dict[str, Any]:
    """Return ``[tool.flwr.app.config]`` of this app."""
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def parse_federation(text: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge ``--federation-config`` over ``base`` (the launcher's defaults) and type-check it."""
    fed = dict(DEFAULT_FEDERATION if base is None else base)
    for key, value in parse_pairs(text).items():
        kind = FEDERATION_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"federation-config key '{key}' is unknown. Allowed: {', '.join(FEDERATION_KEYS)}.")
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise ConfigError(f"federation-config key '{key}' = {value!r}: expected {kind.__name__}.")
        fed[key] = value
    if fed["num-supernodes"] < 1:
        raise ConfigError(f"federation-config key 'num-supernodes' = {fed['num-supernodes']}: must be >= 1.")
    return fed


def federation_string(fed: dict[str, Any]) -> str:
    """Render a federation config for ``flwr run --federation-config``."""
    def render(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else (f'"{v}"' if isinstance(v, str) else str(v))

    return " ".join(f"{k}={render(v)}" for k, v in fed.items())


def prepare(run_config: str, federation_config: str, out: str, resume: str = "",
            isolated: bool = False) -> tuple[RunConfig, dict[str, Any], Path, list[str]]:
    """Parse and check everything a run needs; raise ConfigError/DataNotFoundError early.

    With ``resume`` (a results folder of an earlier launch), the run config and federation
    come from that folder; ``run_config`` may then change only the keys a resumed run may
    change (``server_app.results.RESUMABLE_KEYS``). Returns the config (with absolute
    ``out-dir`` and ``data-dir``), the federation config, the results folder and warnings.

    ``isolated``: the checks (which import torch and read the data) run in a child process,
    so that this process, which then only watches the run, stays small: ``import torch`` alone
    is about 500 MB of resident memory here, for as long as the run lasts.
    """
    if isolated:
        return _prepare_isolated(run_config, federation_config, out, resume)
    from server_app.preflight import parse_run_config, preflight
    from workloads.data import resolve_data_dir

    overrides = parse_pairs(run_config)
    if resume:
        fused, fed = _resumed(Path(resume).expanduser().resolve(), overrides, federation_config)
    else:
        fused, fed = project_defaults() | overrides, parse_federation(federation_config)
    cfg = parse_run_config(fused)
    data = resolve_data_dir(cfg.data_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out or cfg.out_dir or REPO_ROOT / "results" / f"{stamp}-{cfg.dataset}-s{cfg.seed}")
    cfg = cfg.replace(out_dir=str(out_dir.expanduser().resolve()), data_dir=str(data) if data else "")
    warnings = preflight(cfg, fed["num-supernodes"], fed["client-resources-num-cpus"])
    return cfg, fed, Path(cfg.out_dir), warnings


def _prepare_isolated(run_config: str, federation_config: str, out: str,
                      resume: str) -> tuple[RunConfig, dict[str, Any], Path, list[str]]:
    """``prepare`` in a child process; its errors raised here as the same exceptions."""
    import subprocess

    request = json.dumps({"args": [run_config, federation_config, out, resume]})
    child = subprocess.run([sys.executable, "-c", "import flb.launch.run as r; r._prepare_child()"],
                           input=request, capture_output=True, text=True, cwd=REPO_ROOT)
    try:
        answer = json.loads(child.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"the pre-flight check crashed (exit {child.returncode}):\n{child.stderr[-3000:]}") from None
    if "error" in answer:
        from workloads.errors import DataNotFoundError

        raise (DataNotFoundError if answer["kind"] == "DataNotFoundError" else ConfigError)(answer["error"])
    cfg = RunConfig.from_mapping(answer["config"])
    return cfg, answer["federation"], Path(cfg.out_dir), answer["warnings"]


def _resumed(folder: Path, overrides: dict[str, Any],
             federation_config: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run config and federation of the earlier run in ``folder``, with the allowed changes."""
    from server_app.results import RESUMABLE_KEYS

    saved = folder / "run_config.toml"
    if not saved.exists():
        raise ConfigError(f"--resume '{folder}': no run_config.toml there. Allowed: a results folder of python -m flb.launch.")
    changed = sorted(set(overrides) - RESUMABLE_KEYS)
    if changed:
        raise ConfigError(f"--resume: run-config key '{changed[0]}' cannot change in a resumed run. "
                          f"Allowed: {', '.join(sorted(RESUMABLE_KEYS - {'resume', 'out-dir'}))}.")
    with open(saved, "rb") as f:
        fused = tomllib.load(f) | overrides | {"resume": True, "out-dir": str(folder)}
    fed_file = folder / "federation.json"
    fed = parse_federation(federation_config, json.loads(fed_file.read_text()) if fed_file.exists() else None)
    saved_nodes = json.loads(fed_file.read_text())["num-supernodes"] if fed_file.exists() else fed["num-supernodes"]
    if fed["num-supernodes"] != saved_nodes:
        raise ConfigError(f"--resume: federation-config key 'num-supernodes' = {fed['num-supernodes']}: must stay "
                          f"{saved_nodes}, the partitions depend on it.")
    return fused, fed


def _prepare_child() -> None:
    """``prepare(..., isolated=True)``'s child: read its arguments from stdin, print the outcome as JSON."""
    args = json.loads(sys.stdin.read())["args"]
    try:
        cfg, fed, _, warnings = prepare(*args)
        answer: dict[str, Any] = {"config": cfg.to_mapping(), "federation": fed, "warnings": warnings}
    except (ConfigError, FileNotFoundError) as err:
        answer = {"error": str(err), "kind": type(err).__name__}
    print(json.dumps(answer), flush=True)


def launch(cfg: RunConfig, fed: dict[str, Any], out_dir: Path, quiet: bool = False,
           on_line: Callable[[str], None] | None = None) -> int:
    """Run the app on a private SuperLink; return 0 when the run completed.

    ``quiet`` keeps the run's log out of stdout (it still goes to ``run.log``); ``on_line`` sees
    every log line (``flb.run`` advances its progress bar with it).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    toml_path = out_dir / "run_config.toml"
    atomic_write_text(toml_path, tomli_w.dumps(cfg.to_mapping()))
    atomic_write_json(out_dir / "federation.json", fed)
    with LocalSuperLink(log_path=out_dir / "superlink.log") as link:
        print(f"SuperLink pid {link.proc.pid} on port {link.port}; FLWR_HOME={link.flwr_home}", flush=True)
        run_id = link.submit(REPO_ROOT, toml_path, federation_string(fed))
        print(f"run {run_id} {'resumed' if cfg.resume else 'submitted'}: {cfg.dataset}, B={cfg.global_batch_size}, "
              f"{cfg.num_server_rounds} rounds, {federation_string(fed)}", flush=True)
        link.stream_logs(run_id, out_dir / "run.log", echo=not quiet, on_line=on_line)
        outcome = link.outcome(run_id)
    print(f"run {run_id}: {outcome.status} {outcome.details}".rstrip(), flush=True)
    return 0 if outcome.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m flb.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--run-config", default="", help='e.g. "dataset=cifar10 global-batch-size=512"')
    parser.add_argument("--federation-config", default="",
                        help="e.g. \"num-supernodes=8 client-resources-num-cpus=1\" (these are the defaults)")
    parser.add_argument("--out", default="", help="results folder (default: results/<time>-<dataset>-s<seed>)")
    parser.add_argument("--resume", default="", metavar="DIR",
                        help="continue the run in results folder DIR from its checkpoint.pt")
    args = parser.parse_args(argv)
    if args.resume and args.out:
        print("error: --resume DIR continues in DIR; do not also give --out", file=sys.stderr)
        return 2
    try:
        cfg, fed, out_dir, warnings = prepare(args.run_config, args.federation_config, args.out, args.resume,
                                              isolated=True)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        code = launch(cfg, fed, out_dir)
    except KeyboardInterrupt:
        print("interrupted; the SuperLink was stopped", file=sys.stderr)
        code = 130
    print(out_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())
