"""A Ray cluster started outside the app, on this machine, for the simulation to join.

``LocalRayCluster(nodes=2, cpus_per_node=1)`` starts a head node and ``nodes - 1`` more Ray
nodes with ``ray start --block`` (each its own raylet: a stand-in for another host), owns
their process trees and stops them by pid. Inside the block, ``RAY_ADDRESS`` points at the
head, and Flower's Ray engine, started by the launcher, joins this cluster instead of
starting its own: virtual clients run on every node (``clients.csv``: ``ray_node``).

On real hosts the same is ``ray start --head --port 6379`` on one machine and
``ray start --address <head>:6379`` on the others, then ``RAY_ADDRESS=<head>:6379`` in the
environment of the launcher (docs/running.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from flb.launch.superlink import bin_path, free_port, stop_tree


class LocalRayCluster:
    """Context manager owning a head and worker Ray nodes on 127.0.0.1."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, log_dir: Path | None = None) -> None:
        if nodes < 1 or cpus_per_node < 1:
            raise ValueError(f"nodes = {nodes}, cpus_per_node = {cpus_per_node}: both must be >= 1")
        self.nodes, self.cpus = nodes, cpus_per_node
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_dir = log_dir or Path("/tmp") / f"flb-ray-{self.port}"
        self.procs: list[subprocess.Popen] = []
        self._saved = os.environ.get("RAY_ADDRESS")

    def _start(self, args: list[str], name: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ, RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
        env.pop("RAY_ADDRESS", None)
        self.procs.append(subprocess.Popen([bin_path("ray"), "start", "--block", "--disable-usage-stats",
                                            f"--num-cpus={self.cpus}", *args], env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self) -> LocalRayCluster:
        self._start(["--head", f"--port={self.port}", "--include-dashboard=false"], "head")
        self._wait(1)
        for i in range(1, self.nodes):
            self._start([f"--address={self.address}"], f"node-{i}")
        self._wait(self.nodes)
        os.environ["RAY_ADDRESS"] = self.address
        return self

    def alive_nodes(self) -> list[str]:
        """Ids of the cluster's live nodes (asked through a short-lived driver)."""
        code = ("import json, ray; ray.init(address='%s', logging_level='ERROR'); "
                "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))") % self.address
        res = subprocess.run([bin_path("python"), "-c", code], capture_output=True, text=True, timeout=120)
        try:
            return json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return []

    def _wait(self, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.alive_nodes()) < count:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError(f"the Ray cluster did not reach {count} nodes; see {self.log_dir}")
            time.sleep(1.0)

    def stop(self) -> None:
        """Stop every node started here (workers first), by pid."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                stop_tree(proc, grace_s=10.0)
        self.procs = []
        # `ray start` records the cluster in /tmp/ray/ray_current_cluster and `ray stop` would remove
        # it; stopped by pid, the record stays, and a later ray.init() without an address would try
        # to join the dead cluster. Remove it if it is ours.
        record = Path("/tmp/ray/ray_current_cluster")
        try:
            if record.read_text().strip().endswith(f":{self.port}"):
                record.unlink()
        except OSError:
            pass
        if self._saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = self._saved

    def __exit__(self, *exc: object) -> None:
        self.stop()
