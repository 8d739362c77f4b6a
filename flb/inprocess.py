"""Flower without Flower's runtime: the real ServerApp and ClientApp in one process, and test doubles.

``run_inprocess(run_config, num_clients)`` calls ``server_app.app.app`` with a Grid that
delivers each message to ``client_app.app.app`` directly, one client after another, with a
``Context`` per node. The strategy, the client code and the results folder are exactly those
of ``flwr run``; only the transport differs (with one torch thread, the final model is
bit-identical to a Ray run's). A client exception becomes an error reply, as in Flower's
runtimes. ``flb.run`` and ``flb.sweep`` are built on it.

The test doubles (``FakeGrid``, ``delivered``, ``client_context``, ``reply_via_client``) live
here too, so tests, experiments and notebooks share one copy.

It relies on one private Flower API: ``flwr.supercore.task_identity.TaskIdentity`` must be set
to build messages outside a Flower runtime (``set_task_identity``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid


def set_task_identity() -> None:
    """Let this process build Flower messages outside a Flower runtime (a private Flower API)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process."""

    in_process = True  # server_app.grid.RoundGrid calls send_and_receive, not push/pull

    def __init__(self, client_app, num_nodes: int, run_config: dict[str, Any],
                 node_configs: list[dict[str, Any]] | None = None) -> None:
        from estimators.memory_events import start_profiler_here

        start_profiler_here()  # clients profile their step in worker threads (timeouts): init it here, once
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


def run_inprocess(run_config: dict[str, Any], num_clients: int,
                  client_app: Callable[[Message, Context], Message] | None = None,
                  node_configs: list[dict[str, Any]] | None = None) -> Path:
    """Run the app in this process; return the results folder.

    Parameters
    ----------
    run_config : dict
        Kebab-case run-config overrides (missing keys take the pyproject defaults). Give
        ``out-dir`` to choose the results folder (default ./results/<stamp>-inprocess-<dataset>-s<seed>).
        The launcher's pre-flight checks run first (server_app/preflight.py).
    num_clients : int
        Number of virtual nodes (num-supernodes); node i has partition-id i.
    client_app : callable, optional
        What answers the messages instead of the real ClientApp, e.g. an
        ``experiments.faults.FaultyClientApp`` around it.
    node_configs : list of dict, optional
        Node i's ``node_config`` (default: partition-id i of ``num_clients``), as a SuperNode's
        ``--node-config`` would give it, e.g. ``{"data-dir": ...}`` for node-local data.

    Logging is left as it is; ``flb.run`` quiets Flower and shows a progress bar.
    """
    import torch

    from client_app.app import app as real_client_app
    from flb.launch.run import project_defaults
    from server_app.app import app as server_app
    from server_app.preflight import parse_run_config, preflight

    set_task_identity()
    cfg = parse_run_config(project_defaults() | run_config)
    if not cfg.out_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg = cfg.replace(out_dir=str(Path("results") / f"{stamp}-inprocess-{cfg.dataset}-s{cfg.seed}"))
    cfg = cfg.replace(out_dir=str(Path(cfg.out_dir).expanduser().resolve()))
    for warning in preflight(cfg, num_clients, torch.get_num_threads()):
        logging.getLogger("flwr").warning(warning)
    full = cfg.to_mapping()
    grid = InProcessGrid(client_app or real_client_app, num_clients, full, node_configs)
    server_app(grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=full))
    return Path(cfg.out_dir)


# ----------------------------------------------------------------------------- test doubles
class FakeGrid:
    """The part of a Flower Grid the strategy uses outside a round: node ids and the identify query.

    Node ``node_ids[i]`` holds partition i of ``len(node_ids)``.
    """

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:  # noqa: D102 - Grid API
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - Grid API
        replies = []
        for m in messages:
            assert m.metadata.message_type == "query.identify", m.metadata.message_type
            pid = self.node_ids.index(m.metadata.dst_node_id)
            content = RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-partitions": len(self.node_ids)})})
            replies.append(Message(content, reply_to=delivered(m)))
        return replies


def delivered(msg: Message) -> Message:
    """``msg`` as a ClientApp receives it: with the metadata the SuperLink would add."""
    md = msg.metadata
    return Message(
        content=msg.content,
        metadata=Metadata(
            run_id=1, message_id=f"m{md.dst_node_id}-{time.time_ns()}", src_node_id=1,
            dst_node_id=md.dst_node_id, reply_to_message_id="", group_id=md.group_id or "1",
            created_at=time.time(), ttl=3600.0, message_type=md.message_type or MessageType.TRAIN,
        ),
    )


def reply_via_client(client_app, msg: Message, ctx: Context) -> Message:
    """Deliver ``msg`` to the ClientApp the way a SuperNode does and return the reply."""
    return client_app(delivered(msg), ctx)


def client_context(node_id: int, partition_id: int, num_partitions: int, run_config: dict) -> Context:
    """A fresh ClientApp context as simulation builds it."""
    return Context(
        run_id=1, node_id=node_id, state=RecordDict(), run_config=dict(run_config),
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
    )


def state_arrays(state) -> ArrayRecord:
    """A copy of a state dict as the ArrayRecord the strategy sends."""
    return ArrayRecord({k: v.clone() for k, v in state.items()})
