"""The ClientApp side of virtual clients: answer a bundle as each of its virtual clients.

See strategies/packing.py. A bundle's inner messages run one after another in this process,
each with a fresh ``Context`` whose node config names the inner message's partition (of
``virtual-clients``); a client keeps no state between rounds (the server sends its sampler
position), so nothing else is needed. An inner client's exception becomes that client's
error; the other clients of the bundle are unaffected.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from flwr.app import Context, Message, Metadata, RecordDict

from strategies.arrays import out_of_band
from strategies.packing import bundle, unbundle, virtual_partition
from workloads.config import ConfigError, RunConfig


def answer_bundle(client_app: Callable[[Message, Context], Message], msg: Message, context: Context) -> Message:
    """Run every inner message of bundle ``msg`` through ``client_app``; reply with the bundled replies.

    Raises
    ------
    ConfigError
        If the run has ``virtual-clients = 0``, or this node holds its own data (``data-dir``:
        a deployed SuperNode can only be its own client).
    """
    cfg = RunConfig.from_mapping(context.run_config)
    if cfg.virtual_clients < 1:
        raise ConfigError("a bundle of virtual clients arrived, but run-config key 'virtual-clients' = 0.")
    if context.node_config.get("data-dir"):
        raise ConfigError(
            f"run-config key 'virtual-clients' = {cfg.virtual_clients}: this node holds its own data "
            f"(node-config data-dir = '{context.node_config['data-dir']}') and can only be its own client. "
            "Allowed: virtual-clients = 0 on SuperNodes with node-local data."
        )
    parts, meta = unbundle(msg.content)
    md = msg.metadata
    replies: list[RecordDict] = []
    errors: list[str] = []
    for j, (content, node, mtype) in enumerate(zip(parts, meta["nodes"], meta["types"])):
        inner = Message(content=content, metadata=Metadata(
            run_id=md.run_id, message_id=f"{md.message_id}.{j}", src_node_id=md.src_node_id, dst_node_id=int(node),
            reply_to_message_id="", group_id=md.group_id, created_at=md.created_at, ttl=md.ttl, message_type=str(mtype),
        ))
        node_config = dict(context.node_config) | {"partition-id": virtual_partition(int(node)),
                                                    "num-partitions": cfg.virtual_clients}
        ctx = Context(run_id=context.run_id, node_id=int(node), node_config=node_config, state=RecordDict(),
                      run_config=context.run_config)
        try:
            reply = client_app(inner, ctx)
            error = reply.error.reason if reply.has_error() else ""
        except Exception as err:  # noqa: BLE001 - as Flower's runtimes do: the client's error, not the bundle's
            error = f"{type(err).__name__}: {err}"
        replies.append(RecordDict() if error else reply.content)
        errors.append(error)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # a Ray actor: see arrays.out_of_band
        for content in replies:
            for record in content.array_records.values():
                out_of_band(record)
    return Message(content=bundle(replies, {"errors": errors}), reply_to=msg)
