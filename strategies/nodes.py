"""Which node holds which partition, and a deterministic choice of the round's clients.

Flower node ids are random (a fresh simulation or a restarted SuperNode gets new ones), so
anything ordered or keyed by node id changes from one deployment of the same config to the
next: which client gets the extra example of an uneven split, which clients are sampled, the
order in which gradients are summed. The server therefore asks every new node once for its
partition id (a ``query.identify`` message) and orders, samples and assigns by partition id.

Asking costs one message per node, and in Flower's simulation each message costs a ClientApp
call, which for 10,000 virtual clients takes minutes (docs/running.md). With
more than ``IDENTIFY_ALL_MAX`` nodes, clients sampled per round (``clients-per-round`` > 0) and
the ``fixed`` batch policy, the directory is *lazy* instead: it asks nobody, the round's clients
are drawn from the connected nodes in node-id order, and each node's partition is learned from
its first train reply (``learn``). The run is then reproducible only for the same node ids.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from protocol import messages as proto

IDENTIFY = "query.identify"  # message type; the ClientApp answers with partition-id and num-partitions
STARTUP_WAIT_S = 120.0  # the first identify waits at least this long: it starts the Ray actors / client processes
IDENTIFY_ALL_MAX = 1000  # more connected nodes than this (and sampling, fixed batches): lazy directory
QUARANTINE_S = 60.0  # a node that missed a round's deadline sits out this long: Flower 1.41 lists a dead node
# as connected until it misses two 30-s heartbeats (flwr.common.constant HEARTBEAT_*), so without this every
# round of that minute would wait round-timeout-s for it again


@dataclass
class NodeDirectory:
    """Node id -> partition id, learned from identify replies and kept for the run."""

    partitions: dict[int, int] = field(default_factory=dict)
    num_partitions: dict[int, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # node id -> why it did not identify (last attempt)
    quarantined: dict[int, float] = field(default_factory=dict)  # node id -> time.monotonic() it may return
    _reported: set = field(default_factory=set)  # warnings already given (duplicates, gaps)
    lazy: bool | None = None  # None: decided at the first refresh (``decide``)
    _owners: dict = field(default_factory=dict)  # lazy mode: partition id -> the node that replied with it

    def decide(self, connected: int, sampling: bool, fixed_batches: bool) -> bool:
        """Choose lazy or eager identification once, from the first round's connected nodes."""
        if self.lazy is None:
            self.lazy = connected > IDENTIFY_ALL_MAX and sampling and fixed_batches
            if self.lazy:
                log(INFO, "%d nodes: partitions are learned from the sampled clients' replies instead of asking "
                    "every node first (%d messages); clients are drawn by node id", connected, connected)
        return self.lazy

    def learn(self, node: int, partition_id: int, num_partitions: int) -> str | None:
        """Lazy mode: record ``node``'s partition from a train reply; the reason it is refused, or None."""
        owner = self._owners.setdefault(partition_id, node)
        if owner != node:
            return f"partition-id = {partition_id} is already node {owner}'s"
        self.partitions[node], self.num_partitions[node] = partition_id, num_partitions
        return None

    def refresh(self, grid: Grid, connected: Sequence[int], timeout_s: float) -> dict[int, int]:
        """Identify the connected nodes not seen before; return the usable nodes' partitions.

        In lazy mode nobody is asked; a node whose partition is not known yet gets a key of its
        own below zero (``-1 - its rank by node id``), so that keys stay distinct.

        A node that does not answer (or answers with an error) is not usable this round and is
        asked again next round. The run's first query waits at least ``STARTUP_WAIT_S``: it is
        what starts the clients (Ray actors take seconds to start), and it ends
        as soon as every node has answered. When two nodes claim the same partition, only the one with the
        lower node id is used, and a warning names both: their gradients would be duplicates.
        """
        new = [] if self.lazy else [n for n in connected if n not in self.partitions]
        if new:
            messages = [Message(RecordDict({proto.CONFIG: ConfigRecord({})}), message_type=IDENTIFY, dst_node_id=n)
                        for n in new]
            wait = timeout_s if self.partitions else max(timeout_s, STARTUP_WAIT_S)
            replies = list(grid.send_and_receive(messages, timeout=wait))
            silent = sorted(set(new) - {r.metadata.src_node_id for r in replies})
            if silent:
                log(WARNING, "nodes %s did not identify themselves within %.0f s; asked again next round", silent, wait)
            self.errors |= {n: f"no identify reply within {wait:.0f} s" for n in silent}
            for reply in replies:
                node = reply.metadata.src_node_id
                if reply.has_error():
                    self.errors[node] = reply.error.reason
                    log(WARNING, "node %d did not identify itself: %s", node, reply.error.reason)
                    continue
                try:
                    m = reply.content[proto.METRICS]
                    pid, nparts = int(m[proto.PARTITION_ID]), int(m[proto.NUM_PARTITIONS])
                except (KeyError, TypeError, ValueError) as err:
                    self.errors[node] = f"unreadable identify reply ({err})"
                    log(WARNING, "node %d sent an unreadable identify reply (%s)", node, err)
                    continue
                self.partitions[node], self.num_partitions[node] = pid, nparts
                self.errors.pop(node, None)
        now = time.monotonic()
        self.quarantined = {n: t for n, t in self.quarantined.items() if t > now}
        usable: dict[int, int] = {}
        owners: dict[int, int] = {}  # partition id -> the node that uses it
        for rank, node in enumerate(sorted(n for n in connected if n not in self.quarantined)):
            pid = self.partitions.get(node)
            if pid is None:
                if self.lazy:
                    usable[node] = -1 - rank
                continue
            owner = owners.setdefault(pid, node)
            if owner == node:
                usable[node] = pid
            elif (owner, node) not in self._reported:
                self._reported.add((owner, node))
                log(WARNING, "nodes %d and %d both claim partition-id %d: only node %d is used. Give every "
                    "SuperNode its own --node-config partition-id.", owner, node, pid, owner)
        if not self.lazy:
            self._report_gaps(usable)
        return dict(sorted(usable.items(), key=lambda kv: (kv[1], kv[0])))

    def quarantine(self, node: int) -> None:
        """Leave ``node`` out for ``QUARANTINE_S`` seconds (it missed a deadline: dead, or stalled)."""
        self.quarantined[node] = time.monotonic() + QUARANTINE_S
        log(WARNING, "node %d missed the round's deadline: left out for %.0f s unless Flower drops it sooner",
            node, QUARANTINE_S)

    def _report_gaps(self, usable: dict[int, int]) -> None:
        counts = {self.num_partitions[n] for n in usable}
        if not counts:
            return
        gaps = tuple(sorted(set(range(max(counts))) - set(usable.values())))
        if gaps and ("gaps", gaps) not in self._reported:
            self._reported.add(("gaps", gaps))
            log(WARNING, "partitions without a connected node: %s (their examples are left out)", list(gaps))
        if len(counts) > 1 and ("counts", tuple(counts)) not in self._reported:
            self._reported.add(("counts", tuple(counts)))
            log(WARNING, "nodes disagree on num-partitions: %s", sorted(counts))


def sample_nodes(usable: dict[int, int], k: int, rng: np.random.Generator) -> list[int]:
    """Choose ``k`` of the usable nodes, ordered by partition id; the draw depends only on the partitions.

    Parameters
    ----------
    usable : dict
        Node id -> partition id.
    k : int
        Clients this round.
    rng : numpy.random.Generator
        The strategy's generator (checkpointed, so a resumed run draws the same clients).
    """
    order = sorted(usable, key=lambda n: (usable[n], n))
    positions = sorted(int(i) for i in rng.choice(len(order), size=k, replace=False))
    return [order[i] for i in positions]


class NodesUnavailable(RuntimeError):
    """No node was usable for a round within its wait: a run-time condition, not a config error."""


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float) -> list[int]:
    """The connected node ids, once at least ``minimum`` are connected or ``timeout_s`` has passed."""
    start = last_log = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        now = time.monotonic()
        if now - start >= timeout_s:
            log(WARNING, "%d nodes connected after %.0f s, %d wanted: going on with those", len(nodes), now - start,
                minimum)
            break
        if now - last_log > 10:
            log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), minimum)
            last_log = now
        time.sleep(0.5)
    return nodes
