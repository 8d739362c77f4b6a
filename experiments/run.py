"""Launch one simulation safely: ``python -m experiments.run [--run-config ...] [--out DIR]``.

1. Parses the run config (pyproject defaults + ``--run-config``) and the federation config,
   and checks them, the data and the partition sizes before anything starts. Bad input exits
   with status 2 and a message naming the key, the value and what is allowed.
2. Starts a private SuperLink (experiments/superlink.py), submits the app, streams its log.
3. Judges the run by its final status, always stops the SuperLink, and prints the results
   folder as its last line. Exit status 0 only for ``finished:completed``.

``--run-config`` takes Flower's ``key=value`` syntax; unquoted words are taken as strings,
so ``dataset=cifar10`` works as well as ``dataset="cifar10"``. A ``.toml`` file works too.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from experiments.superlink import REPO_ROOT, LocalSuperLink
from workloads.config import ConfigError, RunConfig, check_batches_fit, split_global_batch

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


def parse_federation(text: str) -> dict[str, Any]:
    """Merge ``--federation-config`` over the launcher's defaults and type-check it."""
    fed = dict(DEFAULT_FEDERATION)
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


def prepare(run_config: str, federation_config: str, out: str) -> tuple[RunConfig, dict[str, Any], Path]:
    """Parse and check everything a run needs; raise ConfigError/DataNotFoundError early.

    Returns the config (with absolute ``out-dir`` and ``data-dir``), the federation config
    and the results folder.
    """
    from workloads.data import load_splits, resolve_data_dir
    from workloads.partition import partition_sizes

    overrides = parse_pairs(run_config)
    fused = project_defaults() | overrides
    cfg = RunConfig.from_mapping(fused)
    fed = parse_federation(federation_config)
    nodes = fed["num-supernodes"]
    k = cfg.clients_per_round or nodes
    if k > nodes:
        raise ConfigError(
            f"run-config key 'clients-per-round' = {k}: only num-supernodes = {nodes} clients exist. "
            f"Allowed: 0 (all) or 1..{nodes}."
        )
    folder = resolve_data_dir(cfg.data_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out or cfg.out_dir or REPO_ROOT / "results" / f"{stamp}-{cfg.dataset}-s{cfg.seed}")
    cfg = cfg.replace(out_dir=str(out_dir.expanduser().resolve()), data_dir=str(folder) if folder else "")
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.train_limit)
    sizes = partition_sizes(splits.y_train.numpy(), nodes, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed)
    check_batches_fit(split_global_batch(cfg.global_batch_size, k), sizes)
    return cfg, fed, Path(cfg.out_dir)


def launch(cfg: RunConfig, fed: dict[str, Any], out_dir: Path, quiet: bool = False) -> int:
    """Run the app on a private SuperLink; return 0 when the run completed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    toml_path = out_dir / "run_config.toml"
    toml_path.write_text(tomli_w.dumps(cfg.to_mapping()))
    with LocalSuperLink(log_path=out_dir / "superlink.log") as link:
        print(f"SuperLink pid {link.proc.pid} on port {link.port}; FLWR_HOME={link.flwr_home}", flush=True)
        run_id = link.submit(REPO_ROOT, toml_path, federation_string(fed))
        print(f"run {run_id} submitted: {cfg.dataset}, B={cfg.global_batch_size}, "
              f"{cfg.num_server_rounds} rounds, {federation_string(fed)}", flush=True)
        link.stream_logs(run_id, out_dir / "run.log", echo=not quiet)
        outcome = link.outcome(run_id)
    print(f"run {run_id}: {outcome.status} {outcome.details}".rstrip(), flush=True)
    return 0 if outcome.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n")[0])
    parser.add_argument("--run-config", default="", help='e.g. "dataset=cifar10 global-batch-size=512"')
    parser.add_argument("--federation-config", default="",
                        help="e.g. \"num-supernodes=8 client-resources-num-cpus=1\" (these are the defaults)")
    parser.add_argument("--out", default="", help="results folder (default: results/<time>-<dataset>-s<seed>)")
    args = parser.parse_args(argv)
    try:
        cfg, fed, out_dir = prepare(args.run_config, args.federation_config, args.out)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        code = launch(cfg, fed, out_dir)
    except KeyboardInterrupt:
        print("interrupted; the SuperLink was stopped", file=sys.stderr)
        code = 130
    print(out_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())
