"""A private local SuperLink for one checkout: start it, submit a run, judge it, stop it.

Flower 1.42's ``flwr run`` starts a detached SuperLink that outlives it, reuses any healthy
SuperLink on its port (even another checkout's), installs dependencies with ``uv sync`` per
run unless told not to, and exits 0 when the run failed. This module avoids all four: it
starts its own SuperLink on a free port with ``FLWR_HOME`` inside the checkout, runtime
dependency installation, telemetry and the update check off; it judges the run by its final
status from ``flwr ls --format json``; and it stops exactly the processes it started, by
process id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colour codes of Flower's logger


def bin_path(name: str) -> str:
    """Return the venv's console script ``name`` (next to this interpreter) or ``name``."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(port: int, flwr_home: Path) -> dict[str, str]:
    """The environment for the SuperLink and the ``flwr`` CLI calls of one launch."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        # Without an address, ray.init() joins the cluster last started on this machine (it reads
        # /tmp/ray/ray_current_cluster), even a dead one: it then hangs. "local" starts a private
        # one; set RAY_ADDRESS to join a cluster on purpose (docs/running.md).
        "RAY_ADDRESS": env.get("RAY_ADDRESS") or "local",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    return env


def descendants(pid: int) -> list[int]:
    """Return the ids of all live descendants of ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


@dataclass
class RunOutcome:
    """Final state of a submitted run."""

    run_id: int
    status: str  # e.g. "finished:completed", "finished:failed"
    details: str

    @property
    def ok(self) -> bool:
        """Whether the run completed."""
        return self.status == "finished:completed"


@dataclass(frozen=True)
class Deployment:
    """A SuperLink for real SuperNodes (not simulation): TLS, SuperNode authentication, a database."""

    database: Path  # persistent state (nodes, runs); without it the SuperLink keeps state in memory
    ca_cert: Path | None = None  # TLS: the CA the CLI and the SuperNodes verify the SuperLink with
    cert: Path | None = None  # TLS: the SuperLink's certificate and key (None: --insecure)
    key: Path | None = None
    auth: bool = True  # --enable-supernode-auth: only registered SuperNode keys may connect
    connection: str = "rehearsal"  # the name of the CLI connection in $FLWR_HOME/config.toml

    def superlink_args(self) -> list[str]:
        """The ``flower-superlink`` flags for these settings."""
        tls = (["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.cert), "--ssl-keyfile", str(self.key)]
               if self.cert else ["--insecure"])
        return [*tls, *(["--enable-supernode-auth"] if self.auth else []), "--database", str(self.database)]

    def connection_toml(self, port: int) -> str:
        """``$FLWR_HOME/config.toml`` making this SuperLink the CLI's default connection."""
        secure = f'root-certificates = "{self.ca_cert}"' if self.cert else "insecure = true"
        return (f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n'
                f'address = "127.0.0.1:{port}"\n{secure}\n')


class LocalSuperLink:
    """Context manager owning one ``flower-superlink`` process and its process tree.

    By default a simulation SuperLink (the CLI's managed ``local`` connection on a private
    port); with ``deployment`` one that real SuperNodes connect to, which becomes the default
    connection of this ``FLWR_HOME``.
    """

    def __init__(self, log_path: Path, flwr_home: Path | None = None, port: int | None = None,
                 deployment: Deployment | None = None) -> None:
        self.port = port or free_port()
        self.flwr_home = flwr_home or REPO_ROOT / ".flwr"
        self.log_path = log_path
        self.deployment = deployment
        self.env = flower_env(self.port, self.flwr_home)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalSuperLink:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        mode = ["--simulation"] if self.deployment is None else self.deployment.superlink_args()
        if self.deployment is not None:
            (self.flwr_home / "config.toml").write_text(self.deployment.connection_toml(self.port))
        cmd = [
            bin_path("flower-superlink"), *(["--insecure"] if self.deployment is None else []), *mode,
            "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in __exit__
        self._previous_sigterm = None
        if threading.current_thread() is threading.main_thread():
            # A SIGTERM (timeout, systemd, kill) unwinds through __exit__, which stops the SuperLink:
            # it runs in its own session and would otherwise outlive us.
            self._previous_sigterm = signal.signal(signal.SIGTERM, _terminate)
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_healthy()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    def _wait_healthy(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        tls = self.deployment is not None and self.deployment.cert is not None
        url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/health"
        context = ssl.create_default_context(cafile=str(self.deployment.ca_cert)) if tls else None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"flower-superlink did not become healthy on port {self.port} in {timeout_s:.0f} s")

    def flwr(self, *args: str, capture: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this SuperLink."""
        return subprocess.run(
            [bin_path("flwr"), *args], cwd=REPO_ROOT, env=self.env, text=True,
            capture_output=capture, timeout=timeout, check=False,
        )

    def submit(self, app_dir: Path, run_config_toml: Path, federation_config: str | None) -> int:
        """Submit the app; return the run id (``federation_config`` only in simulation)."""
        fed = ["--federation-config", federation_config] if federation_config is not None else []
        with tempfile.TemporaryDirectory(prefix="flb-app-") as staged:
            app = stage_app(app_dir, Path(staged))
            res = self.flwr("run", str(app), "--format", "json", "--run-config", str(run_config_toml), *fed, timeout=300)
        try:
            return int(json.loads(res.stdout)["run-id"])
        except (ValueError, KeyError) as err:
            raise RuntimeError(f"flwr run did not return a run id:\n{res.stdout}\n{res.stderr}") from err

    def stream_logs(self, run_id: int, log_path: Path, echo: bool = True, on_line=None) -> None:
        """Copy the run's log (ServerApp and simulation) to ``log_path`` and stdout until it ends."""
        proc = subprocess.Popen(
            [bin_path("flwr"), "log", str(run_id), "--stream"], cwd=REPO_ROOT, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        with open(log_path, "a", encoding="utf-8") as log_file:
            for line in proc.stdout:
                log_file.write(ANSI_ESCAPE.sub("", line))
                log_file.flush()  # line by line: a killed run leaves its log up to the last line
                if on_line is not None:
                    on_line(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
        proc.wait()

    def outcome(self, run_id: int, timeout_s: float = 120.0) -> RunOutcome:
        """Poll ``flwr ls --format json`` until the run reaches a final status."""
        deadline = time.monotonic() + timeout_s
        status, details = "unknown", ""
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:  # `flwr ls` would start a new, stray SuperLink
                return RunOutcome(run_id, "superlink-exited", f"the SuperLink stopped; see {self.log_path}")
            res = self.flwr("ls", "--run-id", str(run_id), "--format", "json", timeout=60)
            try:
                run = json.loads(res.stdout)["runs"][0]
                status, details = run["status"], run.get("status-details", "")
            except (ValueError, KeyError, IndexError):
                pass
            if status.startswith("finished"):
                break
            time.sleep(1.0)
        return RunOutcome(run_id, status, details)

    def stop(self) -> None:
        """Stop the SuperLink and every process it started (by pid), then close the log."""
        if self.proc is None:
            return
        stop_tree(self.proc)
        self.proc = None
        self._log.close()


def stop_tree(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM a process and all its descendants (by pid), then SIGKILL what is left after ``grace_s``."""
    tree = descendants(proc.pid)
    for pid in [proc.pid, *tree]:
        _signal(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.2)
    for pid in [proc.pid, *tree]:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    proc.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (a crash, not a shutdown)."""
    for p in [pid, *descendants(pid)]:
        _signal(p, signal.SIGKILL)


STAGE_SKIP = frozenset({"__pycache__", "results", "notebooks", "node_modules"})  # besides hidden folders


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the app's source into ``dest`` (a fresh folder) for ``flwr run``; return ``dest``.

    ``flwr run`` lists every file under the app folder before it applies ``.gitignore``: in a
    checkout with its ``.venv`` that is some 60,000 files and 2.7 s of every launch. The copy
    leaves out hidden folders (``.venv``, ``.git``, ``.flwr``), caches, results and notebooks,
    none of which the apps read; Flower's own rules then filter what is left as before.
    """
    for root, dirs, files in os.walk(app_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in STAGE_SKIP]
        rel = Path(root).relative_to(app_dir)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if not name.endswith((".pyc", ".fab")):
                shutil.copy2(Path(root) / name, dest / rel / name)
    return dest


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
