"""The ClientApp side of virtual clients: answer a bundle as each of its virtual clients.

See protocol/packing.py. Each inner message runs with a fresh ``Context`` whose node config
names its partition (of ``virtual-clients``); a client keeps no state between rounds (the
server sends its sampler position), so nothing else is needed. An inner client's exception
becomes that client's error; the other clients of the bundle are unaffected.

By default the inner messages run one after another. With ``threads`` > 1 (``client-threads``,
for a process given several CPUs) they run that many at a time, each client on one core with
its own model replica (client_app/job.py ``model_slot``): small client steps use one core far
better than two (MNIST CNN, 5 examples: 5.1 ms a step with 2 intra-op threads, 3.0 ms a client
with 2 clients at once on this 2-core machine). The whole bundle then runs with one intra-op
thread, so every client computes exactly what it would alone on one core, whichever thread
runs it. The first client of a process's first bundle of a run, and every client ``alone``
picks (rounds that measure memory), run by themselves first: whatever a process builds on first
use (the memory estimator's fit) and every memory measurement see no other client's work.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from flwr.app import Context, Message, Metadata, RecordDict

from client_app.job import set_model_slot
from client_app.run_config import client_run
from protocol.arrays import out_of_band
from protocol.packing import ERRORS, NODES, TYPES, bundle, unbundle, virtual_partition
from workloads.config import ConfigError, RunConfig


def answer_bundle(client_app: Callable[[Message, Context], Message], msg: Message, context: Context,
                  threads: int = 1, alone: Callable[[RecordDict], bool] | None = None) -> Message:
    """Run every inner message of bundle ``msg`` through ``client_app``; reply with the bundled replies.

    ``threads`` inner messages run at a time (see the module docstring); the first one of this
    process's first bundle of the run, and those whose content ``alone`` picks, run by
    themselves first.

    Raises
    ------
    ConfigError
        If the run has ``virtual-clients = 0``, or this node holds its own data (``data-dir``:
        a deployed SuperNode can only be its own client).
    """
    cfg = client_run(context).cfg
    _check_packed_node(cfg, context.node_config)
    parts, meta = unbundle(msg.content)
    md = msg.metadata

    def answer(j: int) -> tuple[RecordDict, str]:
        node = int(meta[NODES][j])
        inner = Message(content=parts[j], metadata=Metadata(
            run_id=md.run_id, message_id=f"{md.message_id}.{j}", src_node_id=md.src_node_id, dst_node_id=node,
            reply_to_message_id="", group_id=md.group_id, created_at=md.created_at, ttl=md.ttl,
            message_type=str(meta[TYPES][j]),
        ))
        node_config = dict(context.node_config) | {"partition-id": virtual_partition(node),
                                                    "num-partitions": cfg.virtual_clients}
        ctx = Context(run_id=context.run_id, node_id=node, node_config=node_config, state=RecordDict(),
                      run_config=context.run_config)
        try:
            reply = client_app(inner, ctx)
            error = reply.error.reason if reply.has_error() else ""
        except Exception as err:  # noqa: BLE001 - as Flower's runtimes do: the client's error, not the bundle's
            error = f"{type(err).__name__}: {err}"
        return (RecordDict() if error else reply.content), error

    order = range(len(parts))
    if threads > 1:
        with _intra_op_threads(1):
            warm = cfg in _WARM  # a client of this run ran alone here before others ran in parallel: caches built
            first = [j for j in order if (j == 0 and not warm) or (alone is not None and alone(parts[j]))]
            answers = dict(zip(first, map(answer, first)))
            rest = [j for j in order if j not in answers]
            answers |= dict(zip(rest, _client_pool(threads).map(answer, rest)))
        if rest:  # the first client ran alone before them
            _WARM.add(cfg)
    else:
        answers = dict(zip(order, map(answer, order)))
    replies, errors = [answers[j][0] for j in order], [answers[j][1] for j in order]
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # a Ray actor: see arrays.out_of_band
        for content in replies:
            for record in content.array_records.values():
                out_of_band(record)
    return Message(content=bundle(replies, {ERRORS: errors}), reply_to=msg)


def _check_packed_node(cfg: RunConfig, node_config) -> None:
    """Refuse a bundle where packing is off, or on a node that holds its own data."""
    if cfg.virtual_clients < 1:
        raise ConfigError("a bundle of virtual clients arrived, but run-config key 'virtual-clients' = 0.")
    if node_config.get("data-dir"):
        raise ConfigError(
            f"run-config key 'virtual-clients' = {cfg.virtual_clients}: this node holds its own data "
            f"(node-config data-dir = '{node_config['data-dir']}') and can only be its own client. "
            "Allowed: virtual-clients = 0 on SuperNodes with node-local data."
        )


_POOLS: dict[int, ThreadPoolExecutor] = {}
_WARM: set[RunConfig] = set()  # runs this process has run clients of in parallel (after one alone)


def _client_pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` client threads: model replicas 1..threads, one intra-op thread each."""
    if threads not in _POOLS:
        slots = itertools.count(1)

        def start() -> None:
            set_model_slot(next(slots))
            torch.set_num_threads(1)  # this thread's OpenMP and MKL teams

        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="flb-client", initializer=start)
    return _POOLS[threads]


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads in this thread; restore the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
