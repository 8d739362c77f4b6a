"""The Grid as the rounds use it: a start-up grace for the first round, and replies polled every 0.02 s.

Two things of Flower 1.41's Grid do not suit synchronous rounds:

- ``send_and_receive`` waits the same ``timeout`` every round, but round 1 includes every
  client's start-up (data, model, memory estimator; about 60 s for CIFAR-10 on the 2-core
  machine). ``round-timeout-s`` is for the steady state, so the first train round waits
  ``max(round-timeout-s, STARTUP_WAIT_S)``; it still ends as soon as every reply is in.
- A deployed SuperLink's grid (``HttpGrid``) sleeps 3 s between polls for replies, so every
  round on real SuperNodes costs at least 3 s however fast the clients are. ``RoundGrid``
  pushes the messages and polls ``pull_messages`` every ``POLL_S`` seconds itself (the
  simulation's grid would poll every 0.1 s), and keeps which node each message went
  to (``destinations``): when a node dies, the SuperLink answers for it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Error, Message, MessageType, Metadata, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from strategies.nodes import QUARANTINE_S, STARTUP_WAIT_S
from protocol.packing import ERRORS, NODES, PACKED_ACTION, TYPES, bundle, unbundle, virtual_node

POLL_S = 0.02  # seconds between polls for replies (a round waits half of it on average)


class RoundGrid:
    """Wraps a Flower Grid (everything else is delegated to it)."""

    def __init__(self, grid: Grid) -> None:
        self._grid, self._first = grid, True
        self.destinations: dict[str, int] = {}  # message id -> the node it was sent to (the last round)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages`` and collect the replies until all are in or ``timeout`` seconds pass."""
        messages = list(messages)
        if self._first and timeout is not None and any(m.metadata.message_type.startswith(MessageType.TRAIN) for m in messages):
            self._first, timeout = False, max(timeout, STARTUP_WAIT_S)
        if getattr(self._grid, "in_process", False) or not messages:  # flb/inprocess.py runs clients itself
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        ids = list(self._grid.push_messages(messages))
        # A reply can come from the SuperLink instead of the node ("Node Unavailable", source node 1):
        # the strategy attributes replies by the message they answer, through this map.
        self.destinations = {i: m.metadata.dst_node_id for i, m in zip(ids, messages) if i is not None}
        pending = set(self.destinations)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(POLL_S)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class PackedGrid:
    """Virtual clients (``virtual-clients``, protocol/packing.py) over the connected Flower nodes.

    The strategy sees nodes ``virtual_node(0..V-1)``; each ``send_and_receive`` splits its
    messages (in node order) into one contiguous bundle per connected node, and unpacks the
    bundled replies into one reply per virtual client. A Flower node whose bundle got no reply
    within the timeout is left out for ``QUARANTINE_S`` seconds (the strategy quarantines its
    virtual clients too).
    """

    def __init__(self, grid: RoundGrid, virtual_clients: int) -> None:
        self._grid, self.virtual_clients = grid, virtual_clients
        self.destinations: dict[str, int] = {}  # inner message id -> virtual node (the last call)
        self._ids = itertools.count()
        self._left_out: dict[int, float] = {}  # Flower node -> time.monotonic() it may serve again

    def _nodes(self) -> list[int]:
        now = time.monotonic()
        return sorted(n for n in self._grid.get_node_ids() if self._left_out.get(n, 0.0) <= now)

    def get_node_ids(self) -> list[int]:
        """Every virtual client's node id, while at least one Flower node is connected."""
        return [virtual_node(p) for p in range(self.virtual_clients)] if self._nodes() else []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Send ``messages`` (to virtual nodes) as one bundle per Flower node; one reply per answered message."""
        messages = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        nodes = self._nodes()
        if not messages or not nodes:
            return []
        n = min(len(nodes), len(messages))
        cuts = [round(i * len(messages) / n) for i in range(n + 1)]
        chunks = {node: messages[a:b] for node, a, b in zip(nodes, cuts, cuts[1:])}
        bundles = []
        for node, chunk in chunks.items():
            types = [m.metadata.message_type for m in chunk]
            category = MessageType.TRAIN if types[0].startswith(MessageType.TRAIN) else MessageType.QUERY
            content = bundle([m.content for m in chunk], {NODES: [m.metadata.dst_node_id for m in chunk], TYPES: types})
            bundles.append(Message(content, message_type=f"{category}.{PACKED_ACTION}", dst_node_id=node))
        replies = self._grid.send_and_receive(bundles, timeout=timeout)
        sent_to = getattr(self._grid, "destinations", {})
        out: list[Message] = []
        self.destinations = {}
        answered = set()
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node not in chunks or node in answered:
                continue
            answered.add(node)
            out += self._unpack(node, chunks[node], reply)
        for node in set(chunks) - answered:
            self._left_out[node] = time.monotonic() + QUARANTINE_S
            log(WARNING, "Flower node %d sent no reply for its %d virtual clients: left out for %.0f s",
                node, len(chunks[node]), QUARANTINE_S)
        return out

    def _unpack(self, node: int, chunk: list[Message], reply: Message) -> list[Message]:
        """One reply per inner message of ``node``'s bundle (an error reply for each, if the bundle failed)."""
        error = reply.error.reason if reply.has_error() else ""
        parts: list[RecordDict] = []
        errors: list[str] = []
        if not error:
            try:
                parts, meta = unbundle(reply.content)
                errors = [str(e) for e in meta[ERRORS]]
                if len(parts) != len(chunk):
                    raise ValueError(f"{len(parts)} replies for {len(chunk)} messages")
            except (KeyError, TypeError, ValueError) as err:
                error = f"unreadable bundle ({err})"
        out = []
        md = reply.metadata
        for j, m in enumerate(chunk):
            inner = Message(content=RecordDict(), metadata=Metadata(
                run_id=md.run_id, message_id=f"v{next(self._ids)}", src_node_id=md.dst_node_id,
                dst_node_id=m.metadata.dst_node_id, reply_to_message_id="", group_id=m.metadata.group_id or "",
                created_at=time.time(), ttl=m.metadata.ttl or 3600.0, message_type=m.metadata.message_type,
            ))
            self.destinations[inner.metadata.message_id] = m.metadata.dst_node_id
            why = error and f"Flower node {node}: {error}" or errors[j]
            out.append(Message(Error(code=2, reason=why), reply_to=inner) if why else Message(parts[j], reply_to=inner))
        return out

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
