"""Scale of the simulation: ``python -m experiments.bench_scale --clients N --per-round K [--rounds R]``.

A real ``flwr run`` of the app through the launcher (Ray engine, ``client-resources-num-cpus=1``):
``N`` virtual clients, ``K`` sampled per round, MNIST (``--dataset``, default; needs
``FLB_DATA_DIR``) or digits, the default model and a global batch of ``--batch`` (default 20 per
sampled client). While it runs, the memory of the whole process tree (the launcher, the
SuperLink, the simulation, Ray's processes and actors) is sampled every 0.5 s from ``/proc``.

Reported: ``startup_s`` (from the launch to the end of round 1, less one steady round: SuperLink,
Ray, actors, the identify query and the clients' first data load), ``s_per_round`` (the median
wall time of rounds 2..R), ``peak_rss_mb`` (the largest sum of the tree's resident set sizes;
shared pages count once per process) and ``peak_pss_mb`` (the same with shared pages divided
among their processes: the memory really used). The last line is
``clients=<N> per_round=<K> s_per_round=<x> startup_s=<y> peak_rss_mb=<z>``.

The least memory for 10,000 clients on the 2-core machine: one actor with both cores, its
clients computed two at a time (``client-threads``), and two Flower nodes on it (two bundles a
round keep Ray's object store small; docs/running.md)::

    python -m experiments.bench_scale --clients 10000 --per-round 100 --batch 500 --nodes 2 \
        --federation-config client-resources-num-cpus=2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from pathlib import Path

import pandas as pd

from flb.launch.ray_cluster import LocalRayCluster
from flb.launch.run import launch, prepare
from flb.launch.superlink import descendants


def _tree_memory_mb(root: int) -> list[tuple[str, float, float]]:
    """(process, RSS, PSS) of ``root`` and each of its descendants, MiB."""
    rows = []
    for pid in [root, *descendants(root)]:
        try:
            mem = {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in
                   Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]) if k in ("Rss", "Pss")}
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        name = next((Path(c.decode()).name for c in cmd if c and not c.startswith(b"-")
                     and not Path(c.decode()).name.startswith("python")), "?")
        rows.append((f"{name[:40]} ({pid})", mem.get("Rss", 0.0), mem.get("Pss", 0.0)))
    return rows


class MemorySampler(threading.Thread):
    """Samples the process tree's memory every ``interval_s`` until stopped; keeps the peaks."""

    def __init__(self, root: int, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval_s = root, interval_s
        self.peak_rss = self.peak_pss = 0.0
        self.at_peak: list[tuple[str, float, float]] = []  # the processes when the RSS sum peaked
        self._halt = threading.Event()

    def run(self) -> None:  # noqa: D102 - Thread API
        while not self._halt.is_set():
            rows = _tree_memory_mb(self.root)
            rss, pss = sum(r[1] for r in rows), sum(r[2] for r in rows)
            if rss > self.peak_rss:
                self.peak_rss, self.at_peak = rss, rows
            self.peak_pss = max(self.peak_pss, pss)
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        """Stop sampling."""
        self._halt.set()
        self.join()


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print its figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--per-round", type=int, required=True)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--dataset", default="mnist", choices=("mnist", "digits"))
    p.add_argument("--batch", type=int, default=0, help="global batch (default 20 per sampled client)")
    p.add_argument("--out", default="", help="results folder (default: results/scale-<N>-<K>)")
    p.add_argument("--run-config", default="", help="more run-config overrides")
    p.add_argument("--federation-config", default="", help="more federation-config overrides, e.g. client-resources-num-cpus=2")
    p.add_argument("--nodes", type=int, default=0,
                   help="pack the N clients as virtual clients onto this many Flower nodes (virtual-clients=N, "
                        "protocol/packing.py); default 0: N Flower nodes, one client each")
    p.add_argument("--ray-nodes", type=int, default=0,
                   help="start a Ray cluster of this many nodes first (flb/launch/ray_cluster.py) and run on it")
    args = p.parse_args(argv)
    batch = args.batch or 20 * args.per_round
    data = f"data-dir='{os.environ['FLB_DATA_DIR']}'" if args.dataset == "mnist" and os.environ.get("FLB_DATA_DIR") else ""
    out = args.out or f"results/scale-{args.clients}-{args.per_round}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg, fed, out_dir, _ = prepare(
        f"dataset={args.dataset} {data} num-server-rounds={args.rounds} eval-every={args.rounds} "
        f"clients-per-round={args.per_round} global-batch-size={batch} "
        f"{f'virtual-clients={args.clients} ' if args.nodes else ''}{args.run_config}",
        f"num-supernodes={args.nodes or args.clients} {args.federation_config}", out, isolated=True)
    cluster = LocalRayCluster(args.ray_nodes, cpus_per_node=1) if args.ray_nodes else contextlib.nullcontext()
    with cluster:
        sampler = MemorySampler(os.getpid())
        sampler.start()
        start = time.perf_counter()
        code = launch(cfg, fed, out_dir, quiet=True)
        wall = time.perf_counter() - start
        sampler.stop()
    if code != 0:
        raise SystemExit(f"the run failed; see {out_dir}/run.log")
    rounds = pd.read_csv(out_dir / "rounds.csv").set_index("round")
    per_round = float(rounds["wall_s"].diff().loc[2:].median())
    startup = float(rounds.loc[1, "wall_s"]) + (wall - float(rounds["wall_s"].iloc[-1])) - per_round
    if args.ray_nodes:
        clients = pd.read_csv(out_dir / "clients.csv")
        spread = clients.groupby("ray_node").agg(client_steps=("partition_id", "size"), partitions=("partition_id", "nunique"),
                                                 workers=("worker", "nunique"))
        print(f"Ray cluster of {args.ray_nodes} nodes: client steps per Ray node\n{spread.to_string()}")
    result = {"clients": args.clients, "per_round": args.per_round,
              "s_per_round": per_round, "startup_s": startup,
              "peak_rss_mb": sampler.peak_rss, "peak_pss_mb": sampler.peak_pss,
              "flower_nodes": args.nodes or args.clients, "wall_s": wall}
    print("processes at the peak (RSS, PSS MiB):")
    for name, rss, pss in sorted(sampler.at_peak, key=lambda r: -r[1]):
        if rss >= 20:
            print(f"  {name:<48}{rss:>9.0f}{pss:>9.0f}")
    print(f"{args.clients} clients on {args.nodes or args.clients} Flower nodes, {args.per_round} per round, B={batch}, {args.rounds} rounds, {args.dataset}: "
          f"wall {wall:.1f} s, round 1 ended at {rounds.loc[1, 'wall_s']:.1f} s of the ServerApp, "
          f"peak PSS {sampler.peak_pss:.0f} MiB")
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items() if k != "wall_s"))
    return result


if __name__ == "__main__":
    main()
