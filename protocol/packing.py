"""Virtual clients: many partitions served by few Flower nodes, one bundled message per node.

With ``virtual-clients = V`` (simulation only) the app simulates V clients, partitions
0..V-1, whatever the number of Flower nodes. The strategy still sees one node per client
(virtual node id = partition id + 1) and sends one message per sampled client;
``server_app.grid.PackedGrid`` packs a round's messages into one bundle per connected Flower
node, and the ClientApp's ``packed`` handlers (client_app/packing.py) answer each inner
message as that virtual client and bundle the replies. Every client's gradient is checked,
summed and recorded on its own, exactly as without packing.

Why: Flower's simulation engine costs milliseconds per message, and its
dispatch loop asks every registered node for messages on each sweep (a scan of all queued
messages per node: N nodes x K messages), so 10,000 registered nodes with 100 messages a
round spend seconds per round in Flower alone. Packed, a round is a few messages among a
few nodes.

The bundle format: an inner message's record ``name`` is stored under ``"<j>.<name>"``; a
record object that several inner messages share (the global weights) is stored once; the
``pack`` ConfigRecord lists every inner record's name and where it is stored, plus per-inner
lists (destination virtual node and message type going out, error reason coming back).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from workloads.config import RunConfig

PACK = "pack"  # the bundle's ConfigRecord
PACKED_ACTION = "packed"  # bundles travel as "train.packed" or "query.packed"
NODES, TYPES, ERRORS = "nodes", "types", "errors"  # per-inner lists: destinations and types out, errors back


def virtual_node(partition_id: int) -> int:
    """The node id the strategy uses for virtual client ``partition_id`` (Flower ids are non-zero)."""
    return partition_id + 1


def virtual_partition(node_id: int) -> int:
    """The partition of virtual node ``node_id`` (the inverse of ``virtual_node``)."""
    return node_id - 1


def bundle(contents: list[RecordDict], per_inner: dict[str, list[Any]]) -> RecordDict:
    """Pack several messages' contents into one; a record shared by several is stored once.

    Parameters
    ----------
    contents : list of RecordDict
        The inner messages' contents, in order.
    per_inner : dict of lists
        More ``pack`` entries, one value per inner message (e.g. ``nodes``, ``types``, ``errors``).
    """
    out = RecordDict()
    stored: dict[int, str] = {}
    names: list[str] = []
    sources: list[str] = []
    for j, content in enumerate(contents):
        for name, record in content.items():
            key = f"{j}.{name}"
            source = stored.setdefault(id(record), key)
            if source == key:
                out[key] = record
            names.append(key)
            sources.append(source)
    out[PACK] = ConfigRecord({"count": len(contents), "names": names, "sources": sources, **per_inner})
    return out


def unbundle(content: RecordDict) -> tuple[list[RecordDict], dict[str, Any]]:
    """The inner contents of a bundle, and its ``pack`` entries.

    Raises
    ------
    ValueError
        If ``content`` is not a well-formed bundle.
    """
    if PACK not in content.config_records:
        raise ValueError(f"not a bundle: no '{PACK}' ConfigRecord")
    meta = dict(content[PACK])
    count = int(meta["count"])
    names, sources = list(meta.get("names", [])), list(meta.get("sources", []))
    if len(names) != len(sources):
        raise ValueError(f"bundle lists {len(names)} names but {len(sources)} sources")
    parts = [RecordDict() for _ in range(count)]
    for name, source in zip(names, sources):
        j, key = name.split(".", 1)
        parts[int(j)][key] = content[source]
    for key, values in meta.items():
        if key not in ("count", "names", "sources") and len(values) != count:
            raise ValueError(f"bundle of {count} messages lists {len(values)} '{key}'")
    return parts, meta


def bundle_threads(cfg: RunConfig, cpus: int, device: torch.device) -> int:
    """How many clients of a bundle run at once: ``client-threads`` (0: ``cpus``) on a CPU, 1 on a GPU."""
    return 1 if device.type != "cpu" else cfg.client_threads or cpus


def step_threads(cfg: RunConfig, cpus: int, device: torch.device) -> int:
    """Torch intra-op threads of one client step in a process given ``cpus`` CPUs (the memory estimate's key)."""
    return 1 if cfg.virtual_clients and bundle_threads(cfg, cpus, device) > 1 else cpus
