"""Per-round cost on real SuperNodes against simulation: ``python -m experiments.bench_deploy``.

Runs the same config (digits, default model and batch, ``--rounds`` rounds) three ways on this
machine and prints seconds per round after round 1 (the median ``round_trip_s``: from the
server sending the round's messages to the last reply) and what a client process spends:

1. real SuperNodes (deploy/local.py: TLS, authentication), with an empty array
   cache: every node decodes the data, partitions it and fits its memory estimator once;
2. the same again with the cache filled (the steady state of a device);
3. ``flwr run`` simulation (Ray) with as many virtual nodes.

A SuperNode runs every message in a fresh ``flwr-clientapp`` process, so each round pays the
process start-up (``startup_s``: interpreter and imports, torch about 1.5 s) and whatever the
client rebuilds (``setup_s``); Flower's SuperNode also polls the SuperLink for new messages
every 3 s when idle. The last line is
``real_s_per_round=<x> sim_s_per_round=<y> ratio=<x/y> startup_s=<s> setup_s=<t>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from deploy.local import rehearse
from flb.launch.run import launch, prepare


def _summary(out: Path, label: str, wall_s: float) -> dict:
    rounds = pd.read_csv(out / "rounds.csv").set_index("round")
    clients = pd.read_csv(out / "clients.csv")
    later = clients[clients["round"] > 1]
    return {"setting": label, "wall_s": wall_s, "round1_s": float(rounds.loc[1, "round_trip_s"]),
            "s_per_round": float(rounds.loc[2:, "round_trip_s"].median()),
            "startup_s": float(later["startup_s"].median()), "setup_s": float(later["setup_s"].median()),
            "compute_s": float(later["compute_s"].median()),
            "round1_setup_s": float(clients[clients["round"] == 1]["setup_s"].median())}


def main(argv: list[str] | None = None) -> dict:
    """Run the three settings and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--run-config", default="", help="more run-config overrides")
    args = p.parse_args(argv)
    run_config = f"num-server-rounds={args.rounds} eval-every={args.rounds} {args.run_config}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["FLB_CACHE_DIR"] = str(tmp / "cache")  # empty: the first run is a device's first run
        for label in ("real SuperNodes, empty cache", "real SuperNodes, cache filled"):
            cfg, _, out, _ = prepare(run_config, f"num-supernodes={args.nodes}", str(tmp / label.replace(" ", "_")))
            start = time.perf_counter()
            code, _ = rehearse(cfg, args.nodes, tmp / f"work-{len(rows)}", insecure=False, node_data=False, quiet=True)
            assert code == 0, f"{label}: the run failed; see {out}/run.log"
            rows.append(_summary(out, label, time.perf_counter() - start))
            print(rows[-1], flush=True)
        cfg, fed, out, _ = prepare(run_config, f"num-supernodes={args.nodes}", str(tmp / "simulation"))
        start = time.perf_counter()
        assert launch(cfg, fed, out, quiet=True) == 0, f"simulation failed; see {out}/run.log"
        rows.append(_summary(out, "flwr run simulation (Ray)", time.perf_counter() - start))
        print(rows[-1], flush=True)
        shutil.rmtree(tmp / "cache", ignore_errors=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    real, sim = rows[1], rows[2]
    line = {"real_s_per_round": real["s_per_round"], "sim_s_per_round": sim["s_per_round"],
            "ratio": real["s_per_round"] / sim["s_per_round"], "startup_s": real["startup_s"], "setup_s": real["setup_s"]}
    print(" ".join(f"{k}={v:.3f}" for k, v in line.items()))
    return line


if __name__ == "__main__":
    main()
