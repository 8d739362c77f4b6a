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

import time
from collections.abc import Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from strategies.nodes import STARTUP_WAIT_S

POLL_S = 0.02  # seconds between polls for replies (a round waits half of it on average)


class RoundGrid:
    """Wraps a Flower Grid (everything else is delegated to it)."""

    def __init__(self, grid: Grid) -> None:
        self._grid, self._first = grid, True
        self.destinations: dict[str, int] = {}  # message id -> the node it was sent to (the last round)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages`` and collect the replies until all are in or ``timeout`` seconds pass."""
        messages = list(messages)
        if self._first and timeout is not None and any(m.metadata.message_type == MessageType.TRAIN for m in messages):
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
