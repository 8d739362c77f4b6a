"""The Flower strategy for synchronous large-global-batch training: an adapter around the server step.

The round itself is in strategies/server_step.py, as functions of typed values: ``plan_round``
draws the clients and asks the teacher for its plan, ``server_step`` checks the replies,
aggregates, applies the teacher and the optimizer, and both return the next ``ServerState``
(strategies/server_state.py), which is also what a checkpoint holds. This module turns Flower's
hooks into calls of those functions:

- ``configure_train``: wait for and identify the nodes (strategies/nodes.py), ask the batch
  policy for the local batches (strategies/batch_policy.py), ``plan_round``, and send client i
  the global weights and its own config (local batch b_i, micro-batch size, local steps,
  learning rate, and how many examples its partition has drawn so far, so that a client keeps
  no state between rounds and a resumed run draws the same examples).
- ``aggregate_train``: read the replies into ``ClientReply`` values (a lazy node directory
  learns partitions here), ``server_step``, then hand the round's record to the ``RoundSink``
  (server_app/results.py owns the format), quarantine the nodes that did not reply, and return
  the new global model.

Between the hooks the strategy holds the ``ServerState`` (``server_state``) and the current
round's ``StepPlan`` (``plan``); the node directory, the batch policy and the sink live as long
as the run. Only ``configure_train``, ``aggregate_train``, ``configure_evaluate`` and
``summary`` are overridden; ``start`` is Flower's.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from protocol import messages as proto
from strategies.batch_policy import BatchPolicy, round_clients
from strategies.nodes import NodeDirectory, NodesUnavailable, wait_for_nodes
from strategies.privacy import check_private_model
from strategies.records import MemorySink, RoundSink
from strategies.round_plan import client_config, velocity_record
from strategies.server_state import ServerState
from strategies.server_step import (  # noqa: F401 - RoundFailure and DivergenceError: raised through here
    ClientReply,
    DivergenceError,
    ReplyCheck,
    RoundFailure,
    RunSetup,
    StepError,
    StepPlan,
    StepRecord,
    plan_round,
    refused_by_config,
    server_step,
    skip_round,
)
from strategies.teachers import Teacher
from workloads.config import RunConfig
from workloads.errors import ConfigError

NODE_WAIT_S = 300.0  # the first round waits this long for clients-per-round nodes; any round, for one usable node


class LargeBatchStrategy(FedAvg):
    """Synchronous large-global-batch SGD with a teacher hook and checked, partial rounds.

    Parameters
    ----------
    cfg : RunConfig
        The parsed run config.
    initial_state : dict[str, torch.Tensor]
        The model's ``state_dict`` (parameters and buffers) before round 1.
    param_names : list[str]
        Names of the trainable parameters, in ``model.parameters()`` order.
    teacher : Teacher
        The teacher (strategies/teacher_registry.py builds it from the config).
    sink : RoundSink, optional
        Receives each round's records (default: a ``MemorySink``).
    """

    def __init__(self, cfg: RunConfig, initial_state: dict[str, torch.Tensor], param_names: list[str],
                 teacher: Teacher, sink: RoundSink | None = None) -> None:
        super().__init__(min_train_nodes=1, min_available_nodes=1)
        self.cfg = cfg
        self.setup = RunSetup.create(cfg, initial_state, param_names, teacher)
        check_private_model(cfg, self.setup.buffer_names)
        self.server_state = ServerState.initial(initial_state, cfg.seed, teacher.state_dict())  # replaced on resume
        self.plan: StepPlan | None = None  # the current round's
        self.sink: RoundSink = sink if sink is not None else MemorySink()
        self.nodes = NodeDirectory()
        self.policy = BatchPolicy(cfg, self.setup.profiles, self.setup.model_bytes)
        self._grid: Grid | None = None  # the run's: its ``destinations`` (server_app/grid.py) attribute replies
        self._sent: dict[int, tuple] = {}  # this round: node -> (TrainInstruction, arrays, velocity), for retries
        self._start_round: int | None = None  # the state's round when this process started (resume: not 0)
        self._last_short: int | None = None  # the last shrunken round's K (warn once per change)

    @property
    def state(self) -> OrderedDict[str, torch.Tensor]:
        """The global model (parameters and buffers), ``server_state.model``: read it, never write it."""
        return self.server_state.model

    @property
    def param_names(self) -> list[str]:
        """Names of the trainable parameters, in ``model.parameters()`` order."""
        return list(self.setup.param_names)

    @property
    def assigned(self) -> dict[int, tuple[int, int]]:
        """This round's clients: node id -> (partition id, b_i)."""
        return dict(self.plan.assigned) if self.plan is not None else {}

    def summary(self) -> None:
        """Log the strategy's settings."""
        c = self.cfg
        log(INFO, "\t├──> LargeBatchStrategy: global batch %d, clients/round %s, micro-batch %s",
            c.global_batch_size, c.clients_per_round or "all", c.micro_batch_size or "off")
        log(INFO, "\t├──> server SGD lr %.4g (%s, warm-up %d), momentum %.3g, weight decay %.3g, "
            "local steps %d, teacher %s", c.lr, c.schedule, c.warmup_rounds, c.momentum,
            c.weight_decay, c.local_steps, c.teacher)
        log(INFO, "\t└──> faults: min-batch-fraction %.3g (round-retries %d, max-failed-rounds %d), round-timeout-s "
            "%.0f, max-norm-ratio %s, aggregator %s", c.min_batch_fraction, c.round_retries, c.max_failed_rounds,
            c.round_timeout_s, c.max_norm_ratio or "off", c.aggregator)
        if c.exclude_ratio:
            log(INFO, "\t└──> exclude-ratio %g after %d rounds: persistent clients are excluded for good", c.exclude_ratio,
                c.exclude_after)
        if c.dp_clip_norm > 0:
            log(INFO, "\t└──> client-level DP: clip %.4g, noise multiplier %s, delta %.3g, accountant %s",
                c.dp_clip_norm, f"chosen for epsilon <= {c.dp_target_epsilon:g}" if c.dp_target_epsilon else
                f"{c.dp_noise_multiplier:g}", c.dp_delta, c.dp_accountant)

    # ----------------------------------------------------------------- configure
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample K clients by partition id and send each its local batch, sampler position and LR.

        The round's number is the ``ServerState``'s (``server_round`` counts this process's rounds).
        """
        if self._start_round is None:
            self._start_round = self.server_state.round
        usable, k = self._usable_nodes(grid)
        state = self.server_state
        memory, batches, probe_virtual_s, replanned = self.policy.plan(
            state.policy, state.round + 1, usable, grid, self.cfg.round_timeout_s)
        if replanned:
            self.sink.plan(dict(memory.batch_plan))
        state = dataclasses.replace(state, policy=memory,
                                    virtual_total=state.virtual_total + probe_virtual_s)  # the probe costs device time too
        self.server_state, plan = plan_round(state, self.setup, usable, k, batches)
        velocity = velocity_record(plan.teacher_plan, self.setup.param_names, state.velocity)
        velocity = ArrayRecord(velocity) if velocity is not None else None
        self.plan = plan = dataclasses.replace(plan, sent_at=time.perf_counter())
        self._sent = {}
        for node_id, (pid, b) in plan.assigned.items():
            instruction = proto.TrainInstruction(
                plan.round, b, self.cfg.micro_batch_size or b, plan.local_steps, plan.lr,
                self.server_state.drawn.get(pid, 0),
                client_config(plan.teacher_plan, pid, self.cfg.momentum, self.cfg.weight_decay))
            self._sent[node_id] = (instruction, arrays, velocity)
        return [self._train_message(node) for node in plan.assigned]

    def _train_message(self, node: int) -> Message:
        """The round's train message for ``node`` (built again for a retry: a Message is sent once)."""
        instruction, arrays, velocity = self._sent[node]
        return Message(content=instruction.to_content(arrays, velocity), message_type=MessageType.TRAIN,
                       dst_node_id=node)

    def _usable_nodes(self, grid: Grid) -> tuple[dict[int, int], int]:
        """The usable nodes (node id -> partition id, new ones identified) and K, the round's client count.

        The first round waits up to ``NODE_WAIT_S`` for ``clients-per-round`` nodes (start-up);
        every round then draws from the nodes connected and usable now, so fewer of them than
        ``clients-per-round`` shrink the round to all of them (the global batch is kept).
        Raises ``NodesUnavailable`` when no node is usable for ``NODE_WAIT_S``, and ``ConfigError`` at once
        when every connected node refused to identify itself with a ``ConfigError`` (its node config).
        """
        wanted = max(1, self.cfg.clients_per_round) if self.server_state.round == self._start_round else 1
        deadline = time.monotonic() + NODE_WAIT_S
        while True:
            connected = wait_for_nodes(grid, wanted, max(0.0, deadline - time.monotonic()))
            self.nodes.decide(len(connected), 0 < self.cfg.clients_per_round < len(connected),
                              self.cfg.batch_policy == "fixed")
            usable = self.nodes.refresh(grid, connected, self.cfg.round_timeout_s) if connected else {}
            if usable or time.monotonic() >= deadline:
                break
            refusals = {n: self.nodes.errors.get(n, "") for n in connected if n not in self.nodes.quarantined}
            if refusals and all(refused_by_config(r) for r in refusals.values()):
                raise ConfigError(f"round {self.server_state.round + 1}: every connected node refused to identify "
                                  "itself: " + "; ".join(f"node {n}: {r}" for n, r in refusals.items()))
            time.sleep(1.0)  # every connected node is quarantined or did not identify: wait for one
        if not usable:
            why = "; ".join(f"node {n}: {r}" for n, r in self.nodes.errors.items() if n in connected)
            raise NodesUnavailable(
                f"round {self.server_state.round + 1}: no usable node for {NODE_WAIT_S:.0f} s ({len(connected)} "
                f"connected, {len(self.nodes.quarantined)} left out after a missed deadline). {why}")
        k = round_clients(self.cfg.clients_per_round, len(usable))
        if k < self.cfg.clients_per_round and k != self._last_short:
            log(WARNING, "round %d: %d usable nodes, fewer than clients-per-round = %d: the round uses all of them",
                self.server_state.round + 1, k, self.cfg.clients_per_round)
        self._last_short = k if k < self.cfg.clients_per_round else None
        self._grid = grid
        return usable, k

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the ServerApp evaluates the global model centrally."""
        return []

    # ----------------------------------------------------------------- aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Run ``server_step`` on the replies; record the round; return the new global model."""
        replies = list(replies)
        state, record = self._step(self.client_replies(replies))
        self.server_state = state
        self.sink.train(record.row, record.clients)
        for reply in replies:  # aggregated: Flower's loop holds the list until the next round's replies arrive
            if not reply.has_error():
                for name in list(reply.content.array_records):
                    del reply.content[name]  # (packed on Ray: views into its shared object store, freed now)
        row = record.row
        return ArrayRecord(state.model), MetricRecord({proto.TRAIN_LOSS: row["train_loss"],
                                                       "global-batch": row["global_batch"], proto.LR: row["lr"]})

    def _step(self, received: list[ClientReply]) -> tuple[ServerState, StepRecord]:
        """``server_step`` on the round's replies; a round short of ``min-batch-fraction`` retries, then is skipped.

        Up to ``round-retries`` times, the sampled nodes that failed or were silent get their
        unchanged instruction again (``_retry``), and the step is tried again with their new
        replies; a round still short is skipped (``skip_round``).
        """
        plan, cfg, attempt = self.plan, self.cfg, 0
        while True:
            try:
                state, record = server_step(self.server_state, received, plan, received_at=time.perf_counter())
            except RoundFailure as err:
                again = self._retry(received, err.check, attempt) if attempt < cfg.round_retries else None
                if again is not None:
                    received, attempt = again, attempt + 1
                    continue
                return self._skip(err)
            except StepError as err:
                if err.check is not None:
                    self._report(err.check)
                raise
            self._report(record.check)
            if newly := [p for p in state.persistence.excluded if p not in self.server_state.persistence.excluded]:
                log(WARNING, "round %d: partition(s) %s excluded for the rest of the run: their gradients differ from "
                    "most clients' the same way round after round (exclude-ratio = %g)", plan.round,
                    ", ".join(map(str, newly)), cfg.exclude_ratio)
            return state, record

    def _skip(self, err: RoundFailure) -> tuple[ServerState, StepRecord]:
        """Record the short round's failures and skip it (the model unchanged; ``skip_round``)."""
        self._report(err.check)
        state, record = skip_round(self.server_state, self.plan, err)
        log(WARNING, "round %d skipped (%d in a row, max-failed-rounds = %d): %s", self.plan.round,
            state.failed_rounds, self.cfg.max_failed_rounds, err)
        return state, record

    def _retry(self, replies: list[ClientReply], check: ReplyCheck, attempt: int) -> list[ClientReply] | None:
        """The replies after re-sending to the sampled nodes that sent an error or nothing; None if none can be.

        Only within the round's deadline (``round-timeout-s`` after it was sent). A retried node
        gets its unchanged instruction (same b_i, same examples), so a successful retry gives the
        round the step it planned. Invalid replies (failed checks) and refusals with a
        ``ConfigError`` are not retried: they are the client's answer.
        """
        plan, cfg = self.plan, self.cfg
        errored = {r.node_id for r in replies
                   if r.error is not None and r.node_id in plan.assigned and not refused_by_config(r.error)}
        retry = sorted(errored | set(check.missing))
        left = cfg.round_timeout_s - (time.perf_counter() - plan.sent_at)
        if not retry or left < 1.0:
            return None
        log(INFO, "round %d short of min-batch-fraction: retry %d of %d for nodes %s (%.0f s left)", plan.round,
            attempt + 1, cfg.round_retries, retry, left)
        self.sink.failures([f | {"reason": f"{f['reason']} (attempt {attempt + 1}; retried)"}
                            for f in check.failures if f["node_id"] in set(retry)])
        again = self.client_replies(list(self._grid.send_and_receive(
            [self._train_message(n) for n in retry], timeout=left)))
        return [r for r in replies if r.node_id not in set(retry)] + again

    def client_replies(self, messages: list[Message]) -> list[ClientReply]:
        """The round's replies as ``ClientReply`` values, in arrival order.

        Each is attributed to the node the message was sent to (the grid's ``destinations``), and
        carries the partition the node directory knows for it; a lazy directory learns the
        partition of a sampled node from its one reply here.
        """
        destinations = getattr(self._grid, "destinations", {})
        nodes = [destinations.get(m.metadata.reply_to_message_id, m.metadata.src_node_id) for m in messages]
        counts = Counter(nodes)
        out = []
        for node, msg in zip(nodes, messages):
            reply = read_reply(node, msg)
            if (node in self.plan.assigned and self.plan.assigned[node][0] < 0 and counts[node] == 1
                    and reply.error is None):
                reply = self._learn_partition(reply)
            out.append(dataclasses.replace(reply, partition_id=self.nodes.partitions.get(node, -1)))
        return out

    def _learn_partition(self, reply: ClientReply) -> ClientReply:
        """Lazy directory: learn the node's partition from its reply, or say why the reply is refused."""
        claimed = reply.metrics.get(proto.PARTITION_ID)
        if isinstance(claimed, bool) or not isinstance(claimed, int) or claimed < 0:
            return dataclasses.replace(reply, error=f"{proto.PARTITION_ID} = {claimed!r}: a non-negative integer is needed")
        refused = self.nodes.learn(reply.node_id, claimed, -1)
        return reply if refused is None else dataclasses.replace(reply, error=refused)

    def _report(self, check: ReplyCheck) -> None:
        """Quarantine the nodes that did not reply; log and record the failures."""
        for node in check.missing:
            self.nodes.quarantine(node)
        for f in check.failures:
            log(WARNING, "round %d: node %s (partition %s) failed: %s", f["round"], f["node_id"], f["partition_id"],
                f["reason"])
        if check.failures:
            self.sink.failures(check.failures)


def read_reply(node: int, msg: Message) -> ClientReply:
    """A train reply as a ``ClientReply``; its ``error`` says why it cannot be used as sent."""
    if msg.has_error():
        return ClientReply(node, error=f"client error: {msg.error.reason}")
    records = proto.read_reply(msg.content)
    if isinstance(records, str):
        return ClientReply(node, error=records)
    return ClientReply(node, grads=records.grads, buffers=records.buffers, metrics=records.metrics,
                       info=records.info, velocity=records.velocity)
