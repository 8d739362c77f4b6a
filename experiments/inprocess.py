"""Run the real ServerApp and ClientApp in one process, without Ray: for experiments and notebooks.

``run_inprocess(run_config, num_clients)`` calls ``server_app.app.app`` with a Grid that
delivers each message to ``client_app.app.app`` directly, one client after another, with a
persistent ``Context`` per node (as a SuperNode keeps one). The strategy, the client code and
the results folder are exactly those of ``flwr run``; only the transport differs. A client
exception becomes an error reply, as in Flower's runtimes.

Use it for sweeps of many short runs (experiments/paper_claim.py) and from notebooks:

>>> from experiments.inprocess import run_inprocess
>>> rounds = run_inprocess({"num-server-rounds": 20, "teacher": "noise"}, num_clients=8)

It relies on one private Flower API: ``flwr.supercore.task_identity.TaskIdentity`` must be set
to build messages outside a Flower runtime.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.serverapp import Grid


def _set_task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process."""

    in_process = True  # server_app.grid.RoundGrid calls send_and_receive, not push/pull

    def __init__(self, client_app, num_nodes: int, run_config: dict[str, Any],
                 node_configs: list[dict[str, Any]] | None = None) -> None:
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, state=RecordDict(), run_config=dict(run_config),
                              node_config=node_configs[i] if node_configs else {"partition-id": i, "num-partitions": num_nodes})
            for i in range(num_nodes)
        }
        self._ids = itertools.count()
        self._run = None

    def set_run(self, run) -> None:  # noqa: D102 - Grid API
        self._run = run

    @property
    def run(self):  # noqa: D102 - Grid API
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: D102
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102 - Grid API
        return list(self.contexts)

    def push_messages(self, messages):  # noqa: D102 - Grid API
        raise NotImplementedError("InProcessGrid only supports send_and_receive")

    def pull_messages(self, message_ids):  # noqa: D102 - Grid API
        raise NotImplementedError("InProcessGrid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver every message to its node's ClientApp and collect the replies.

        Clients run one after another. Each gets ``timeout`` seconds of its own, as if all ran
        in parallel: a client still running then is abandoned and sends no reply (a straggler).
        """
        replies = []
        for msg in messages:
            md = msg.metadata
            delivered = Message(content=msg.content, metadata=Metadata(
                run_id=1, message_id=f"m{next(self._ids)}", src_node_id=0, dst_node_id=md.dst_node_id,
                reply_to_message_id="", group_id=md.group_id or "", created_at=time.time(), ttl=3600.0,
                message_type=md.message_type,
            ))
            reply = _call(self.client_app, delivered, self.contexts[md.dst_node_id], timeout)
            if reply is not None:
                replies.append(reply)
        return replies


def _call(client_app, msg: Message, context: Context, timeout: float | None) -> Message | None:
    """One ClientApp call; an exception becomes an error reply (as in Flower's runtimes), a timeout no reply."""
    box: list[Message] = []

    def target() -> None:
        try:
            box.append(client_app(msg, context))
        except Exception as err:  # noqa: BLE001 - Flower's runtimes turn these into error replies
            box.append(Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg))

    if timeout is None:
        target()
        return box[0]
    worker = threading.Thread(target=target, daemon=True, name=f"client-{msg.metadata.dst_node_id}")
    worker.start()
    worker.join(timeout)
    return box[0] if box else None


def run_inprocess(run_config: dict[str, Any], num_clients: int, quiet: bool = True,
                  client_app: Callable[[Message, Context], Message] | None = None,
                  node_configs: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    """Run the app in this process; return rounds.csv as a DataFrame.

    Parameters
    ----------
    run_config : dict
        Kebab-case run-config overrides (missing keys take the pyproject defaults). Give
        ``out-dir`` to keep the results folder; otherwise it goes to ./results/<stamp>-inprocess-<dataset>-s<seed>.
        The launcher's pre-flight checks run first (server_app/preflight.py).
    num_clients : int
        Number of virtual nodes (num-supernodes); node i has partition-id i.
    quiet : bool
        Silence Flower's per-round INFO logging.
    client_app : callable, optional
        What answers the messages instead of the real ClientApp, e.g. an
        ``experiments.faults.FaultyClientApp`` around it.
    node_configs : list of dict, optional
        Node i's ``node_config`` (default: partition-id i of ``num_clients``), as a SuperNode's
        ``--node-config`` would give it, e.g. ``{"data-dir": ...}`` for node-local data.
    """
    import logging

    import torch

    from client_app.app import app as real_client_app
    from experiments.run import project_defaults
    from server_app.app import app as server_app
    from server_app.preflight import parse_run_config, preflight

    _set_task_identity()
    cfg = parse_run_config(project_defaults() | run_config)
    if not cfg.out_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg = cfg.replace(out_dir=str(Path("results") / f"{stamp}-inprocess-{cfg.dataset}-s{cfg.seed}"))
    cfg = cfg.replace(out_dir=str(Path(cfg.out_dir).expanduser().resolve()))
    for warning in preflight(cfg, num_clients, torch.get_num_threads()):
        if not quiet:
            print(f"warning: {warning}")
    full = cfg.to_mapping()
    grid = InProcessGrid(client_app or real_client_app, num_clients, full, node_configs)
    logger = logging.getLogger("flwr")
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        server_app(grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=full))
    finally:
        logger.setLevel(level)
    return pd.read_csv(Path(cfg.out_dir) / "rounds.csv")
