"""Rehearse a field deployment on this machine: ``python -m deploy.local --nodes N``.

Brings up a real SuperLink and N real SuperNodes on 127.0.0.1, the way the devices would run
them (docs/deploy.md): TLS with a private CA, SuperNode authentication with one registered
ECDSA key per node, a persistent database, free ports and a private ``FLWR_HOME``. Then it
runs the app with ``flwr run``, streams the ServerApp log, judges the run by ``flwr ls``,
stops every process it started (by pid) and prints the results folder as its last line.

Options: ``--insecure`` (no TLS, no authentication: for a rehearsal only), ``--node-data``
(each node gets only its own partition, the server only the evaluation split:
``deploy.split_data``), ``--kill-node I --kill-at-round R [--restart-after S]`` (SIGKILL
SuperNode I when round R completes, restart it S seconds later: the field's faults).
The run config is checked first, as by the launcher (exit status 2 on bad input).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from deploy.pki import make_node_keys, make_tls
from flb.launch.run import prepare
from flb.launch.superlink import REPO_ROOT, Deployment, LocalSuperLink, bin_path, flower_env, free_port, kill_tree, stop_tree
from workloads.errors import ConfigError
from workloads.files import atomic_write_text


@dataclass
class LocalSuperNode:
    """One ``flower-supernode`` process on this machine."""

    index: int
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start (or restart) the node; its output is appended to ``log_path``."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def stop(self) -> None:
        """Stop the node and its ClientApp processes."""
        if self.proc is not None and self.proc.poll() is None:
            stop_tree(self.proc, grace_s=5.0)
        self.proc = None


def supernode_cmd(port: int, link_port: int, node_config: str, ca_cert: Path | None, key: Path | None) -> list[str]:
    """The ``flower-supernode`` command line of one node (docs/deploy.md shows the same for devices)."""
    secure = ["--root-certificates", str(ca_cert)] if ca_cert else ["--insecure"]
    auth = ["--auth-supernode-private-key", str(key)] if key else []
    return [bin_path("flower-supernode"), "--superlink", f"127.0.0.1:{link_port}", *secure, *auth,
            "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config]


def register(link: LocalSuperLink, public_key: Path) -> int:
    """``flwr supernode register``; return the node id the SuperLink gave the key."""
    res = link.flwr("supernode", "register", str(public_key), "--format", "json", timeout=60)
    try:
        return int(json.loads(res.stdout)["node-id"])
    except (ValueError, KeyError) as err:
        raise RuntimeError(f"registering {public_key} failed:\n{res.stdout}\n{res.stderr}") from err


def online_nodes(link: LocalSuperLink) -> list[int]:
    """Ids of the nodes the SuperLink lists as online."""
    res = link.flwr("supernode", "list", "--format", "json", timeout=60)
    try:
        return [int(n["node-id"]) for n in json.loads(res.stdout)["nodes"] if n.get("status") == "online"]
    except (ValueError, KeyError):
        return []


def wait_online(link: LocalSuperLink, count: int, timeout_s: float = 120.0) -> None:
    """Wait until ``count`` nodes are online."""
    deadline = time.monotonic() + timeout_s
    while len(online := online_nodes(link)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(online)} of {count} SuperNodes came online in {timeout_s:.0f} s")
        time.sleep(0.5)


def _killer(node: LocalSuperNode, rounds_csv: Path, at_round: int, restart_after: float, events: dict) -> None:
    """Kill ``node`` once ``rounds.csv`` shows round ``at_round``; restart it ``restart_after`` s later (< 0: never)."""
    while True:
        try:
            rows = rounds_csv.read_text().splitlines()[1:]
        except FileNotFoundError:
            rows = []
        if rows and int(rows[-1].split(",")[0]) >= at_round:
            break
        time.sleep(0.05)
    kill_tree(node.proc.pid)
    events["killed_at"] = time.time()
    print(f"deploy_local: SIGKILLed SuperNode {node.index} after round {at_round}", flush=True)
    if restart_after >= 0:
        time.sleep(restart_after)
        node.start()
        events["restarted_at"] = time.time()
        print(f"deploy_local: restarted SuperNode {node.index}", flush=True)


def check_intruder(link: LocalSuperLink, workdir: Path, out: Path, ca_cert: Path) -> dict:
    """Start a SuperNode with a key the SuperLink never registered; it must be refused (``[code: 2004]``)."""
    (key, _), = make_node_keys(workdir / "intruder", 1, prefix="intruder")
    node = LocalSuperNode(-1, supernode_cmd(free_port(), link.port, "partition-id=0 num-partitions=1", ca_cert, key)
                          + ["--max-retries", "1"], flower_env(link.port, workdir / "intruder-home"), out / "intruder.log")
    before, start = set(online_nodes(link)), time.monotonic()
    node.start()
    while node.proc.poll() is None and time.monotonic() - start < 60:
        time.sleep(0.2)
    code = node.proc.poll()
    node.stop()
    log = (out / "intruder.log").read_text(errors="replace")
    return {"exit_code": code, "refused": "[code: 2004]" in log, "seconds": round(time.monotonic() - start, 2),
            "online_unchanged": set(online_nodes(link)) == before}


def rehearse(cfg, nodes: int, workdir: Path, insecure: bool, node_data: bool,
             kill: tuple[int, int, float] | None = None, quiet: bool = False, intruder: bool = False) -> tuple[int, dict]:
    """Run ``cfg`` on a local SuperLink and ``nodes`` SuperNodes; return (exit status, events).

    With ``intruder`` (TLS and authentication only), a SuperNode with an unregistered key
    tries to join before the run; ``events["intruder"]`` says whether it was refused.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    pki = None if insecure else make_tls(workdir / "pki", hosts=["localhost"], ips=["127.0.0.1"])
    keys = None if insecure else make_node_keys(workdir / "keys", nodes)
    node_configs = [f"partition-id={i} num-partitions={nodes}" for i in range(nodes)]
    if node_data:
        from workloads.node_data import export_node_data

        export_node_data(cfg, nodes, workdir / "data")
        cfg = cfg.replace(data_dir=str(workdir / "data" / "server"))
        node_configs = [f"{c} data-dir='{workdir / 'data' / f'node-{i}'}'" for i, c in enumerate(node_configs)]
    deployment = Deployment(database=workdir / "state.db", ca_cert=pki and pki["ca_cert"], cert=pki and pki["cert"],
                            key=pki and pki["key"], auth=not insecure)
    toml_path = out / "run_config.toml"
    atomic_write_text(toml_path, tomli_w.dumps(cfg.to_mapping()))
    supernodes: list[LocalSuperNode] = []
    events: dict = {}
    with LocalSuperLink(log_path=out / "superlink.log", flwr_home=workdir / "home", deployment=deployment) as link:
        try:
            print(f"SuperLink pid {link.proc.pid} on 127.0.0.1:{link.port} "
                  f"({'INSECURE' if insecure else 'TLS, SuperNode authentication'}); work folder {workdir}", flush=True)
            ids = [register(link, pub) for _, pub in keys] if keys else []
            for i in range(nodes):
                env = flower_env(link.port, workdir / f"node-{i}-home")
                env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.1"  # the node's executor looks for work every 0.1 s, not 1 s
                node = LocalSuperNode(i, supernode_cmd(free_port(), link.port, node_configs[i], pki and pki["ca_cert"],
                                                       keys[i][0] if keys else None), env, out / f"supernode-{i}.log")
                node.start()
                supernodes.append(node)
            wait_online(link, nodes)
            print(f"{nodes} SuperNodes online{f' (registered ids {ids})' if ids else ''}", flush=True)
            if intruder and not insecure:
                events["intruder"] = check_intruder(link, workdir, out, pki["ca_cert"])
                print(f"unregistered SuperNode: {events['intruder']}", flush=True)
            run_id = link.submit(REPO_ROOT, toml_path, None)
            print(f"run {run_id} submitted: {cfg.dataset}, B={cfg.global_batch_size}, {cfg.num_server_rounds} rounds",
                  flush=True)
            if kill is not None:
                threading.Thread(target=_killer, args=(supernodes[kill[0]], out / "rounds.csv", kill[1], kill[2], events),
                                 daemon=True).start()
            link.stream_logs(run_id, out / "run.log", echo=not quiet)
            outcome = link.outcome(run_id)
        finally:
            for node in supernodes:
                node.stop()
    print(f"run {run_id}: {outcome.status} {outcome.details}".rstrip(), flush=True)
    return (0 if outcome.ok else 1), events


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--run-config", default="", help='e.g. "num-server-rounds=10 min-batch-fraction=0.6"')
    p.add_argument("--out", default="", help="results folder (default: results/<time>-<dataset>-s<seed>)")
    p.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication (rehearsal only)")
    p.add_argument("--node-data", action="store_true", help="each node holds only its own partition")
    p.add_argument("--kill-node", type=int, default=None, help="SIGKILL this SuperNode during the run")
    p.add_argument("--kill-at-round", type=int, default=2)
    p.add_argument("--restart-after", type=float, default=-1.0, help="restart the killed node after this many seconds")
    p.add_argument("--check-intruder", action="store_true", help="also check that an unregistered SuperNode is refused")
    args = p.parse_args(argv)
    try:
        if args.nodes < 1:
            raise ConfigError(f"--nodes = {args.nodes}: need at least 1")
        if args.kill_node is not None and not 0 <= args.kill_node < args.nodes:
            raise ConfigError(f"--kill-node = {args.kill_node}: allowed 0..{args.nodes - 1}")
        cfg, _, out, warnings = prepare(args.run_config, f"num-supernodes={args.nodes}", args.out)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.insecure:
        print("warning: --insecure: no TLS and no SuperNode authentication. Anyone who reaches the port can "
              "submit apps that run on every node. Use it only for a local rehearsal.", file=sys.stderr)
    workdir = REPO_ROOT / ".flwr" / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}-{out.name}"
    kill = (args.kill_node, args.kill_at_round, args.restart_after) if args.kill_node is not None else None
    try:
        code, events = rehearse(cfg, args.nodes, workdir, args.insecure, args.node_data, kill,
                                intruder=args.check_intruder)
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        code, events = 130, {}
    if events:
        atomic_write_text(out / "deploy_events.json", json.dumps(events))
    print(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
