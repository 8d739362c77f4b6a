"""When this process started, for the start-up cost a SuperNode pays on every message.

A SuperNode runs each message in a fresh ``flwr-clientapp`` process, so every round pays the
interpreter, the imports (torch alone is about 1.5 s) and whatever the app rebuilds. The
ClientApp reports ``startup-s``: seconds from the process start to the handler's first line.
"""

from __future__ import annotations

import os


def process_started_at() -> float:
    """Unix time this process started (Linux ``/proc``); NaN where that cannot be read."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return float("nan")


STARTED_AT = process_started_at()


def where() -> dict[str, str]:
    """Where this ClientApp runs: host name, process id and, in a Ray worker, the Ray node id."""
    if not _WHERE:
        _WHERE.update(_where())
    return dict(_WHERE)


_WHERE: dict[str, str] = {}  # it does not change in a process


def _where() -> dict[str, str]:
    import socket
    import sys

    info = {"host": socket.gethostname(), "pid": str(os.getpid())}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        info["ray-node"] = ray.get_runtime_context().get_node_id()[:12]
    return info
