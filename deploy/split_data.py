"""Cut a dataset into node-local folders: ``python -m deploy.split_data --nodes N --out DIR [--run-config ...]``.

Writes ``DIR/server/<dataset>/eval.npz`` (validation and test splits) and
``DIR/node-<i>/<dataset>/partition.npz`` (partition i's training examples), cut exactly as a
run with the same ``--run-config`` would cut them (workloads/node_data.py). Copy
``DIR/node-<i>`` to device i, ``DIR/server`` to the server, and start them with
``--node-config "data-dir='<folder>'"`` and ``--run-config "data-dir='<folder>'"``.
The partitions depend on ``dataset, val-fraction, train-limit, partitioner, dirichlet-alpha,
seed`` and the number of nodes; a run with other values is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flb.launch.run import parse_pairs, project_defaults
from server_app.preflight import parse_run_config
from workloads.errors import ConfigError
from workloads.node_data import export_node_data


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m deploy.split_data", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, required=True, help="number of SuperNodes (num-partitions)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--run-config", default="", help='e.g. "dataset=mnist data-dir=/data seed=1"')
    args = p.parse_args(argv)
    try:
        if args.nodes < 1:
            raise ConfigError(f"--nodes = {args.nodes}: need at least 1")
        cfg = parse_run_config(project_defaults() | parse_pairs(args.run_config))
        paths = export_node_data(cfg, args.nodes, args.out.expanduser().resolve())
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    out = args.out.expanduser().resolve()
    print(f'server:  --run-config "data-dir=\'{out / "server"}\'"')
    print(f'node i:  --node-config "data-dir=\'{out}/node-<i>\'"')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
