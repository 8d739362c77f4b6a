"""The Flower strategy for synchronous large-global-batch training (thin glue).

Each round: identify new nodes (strategies/nodes.py), sample K clients by partition id, send
client i the global weights and its own config (local batch b_i, micro-batch size, local
steps, learning rate, and how many examples its partition has drawn so far), collect one
gradient per client, check every reply (strategies/reply_check.py), average the valid ones
weighted by b_i into the gradient of the global batch (strategies/aggregation.py), pass it
through the teacher (strategies/teachers.py) and apply the server optimizer
(strategies/server_opt.py). With ``local-steps`` H > 1 the clients return pseudo-gradients
(w_0 - w_H) / lr instead, which makes FedAvg-style baselines the same code path. A teacher's
``RoundPlan`` (strategies/round_plan.py) may change a round: its H, learning rate(s), momentum,
a local optimizer on the clients, and per-client gradient multipliers.

Faults: an invalid, failed or late reply drops that client from the round; the step is then
the exact mean over the examples that did arrive, B' = sum of their b_i, as long as B' is at
least ``min-batch-fraction`` of the planned B (else ``RoundFailure``). Nothing changes before
all replies are checked, and a step that would make the weights non-finite is undone
(``DivergenceError``). The server owns every client's sampler position, so a client keeps no
state between rounds and a resumed run (``state_dict`` / ``load_state_dict``) draws the same
examples.

Only ``configure_train``, ``aggregate_train``, ``configure_evaluate`` and ``summary`` are
overridden; ``start`` is Flower's. Results leave through a ``RoundSink``
(server_app/results.py owns their format).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from estimators.performance import client_virtual_seconds
from strategies.aggregation import aggregate_buffers, weighted_mean
from protocol.arrays import record_tensors
from strategies.batch_policy import PolicyState
from strategies.nodes import NodeDirectory, sample_nodes, wait_for_nodes
from strategies.records import MemorySink, RoundSink
from strategies.reply_check import (
    NORM_WINDOW, Expected, check_buffers, check_grad_sq, check_metrics, check_tensors, norm_outliers,
)
from strategies.server_opt import ServerSGD, lr_at
from strategies.teacher_registry import load_teacher_state, teacher_state
from strategies.round_plan import RoundPlan, client_config, round_stats, velocity_record
from strategies.teachers import TeacherInput, TeacherOutput
from workloads.config import RunConfig, split_global_batch
from workloads.devices import parse_profiles, profile_for
from workloads.errors import ConfigError

NODE_WAIT_S = 300.0  # how long to wait for clients-per-round nodes before failing


class RoundFailure(RuntimeError):
    """Too few valid replies: the round's examples fall below ``min-batch-fraction`` of the plan."""


class DivergenceError(RuntimeError):
    """The server step would have made the global model non-finite; it was undone."""


@dataclass
class ValidReply:
    """A reply that passed every check."""

    node_id: int
    partition_id: int
    batch: int  # b_i, examples
    grads: list[torch.Tensor]  # in param_names order; views of the reply's bytes: read them, never write
    buffers: dict[str, torch.Tensor] | None
    metrics: dict[str, float]
    norm: float  # |g_i|
    info: dict[str, str]  # where it ran (host, pid, Ray node), as the client says; for clients.csv only
    momentum: list[torch.Tensor] | None = None  # the client's final velocity (RoundPlan.local_momentum); read only, like grads


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
    teacher : callable
        ``TeacherInput -> TeacherOutput``.
    sink : RoundSink, optional
        Receives each round's records (default: a ``MemorySink``).
    """

    def __init__(
        self,
        cfg: RunConfig,
        initial_state: dict[str, torch.Tensor],
        param_names: list[str],
        teacher: Callable[[TeacherInput], TeacherOutput],
        sink: RoundSink | None = None,
    ) -> None:
        super().__init__(min_train_nodes=1, min_available_nodes=1)
        self.cfg = cfg
        self.state: OrderedDict[str, torch.Tensor] = OrderedDict(
            (k, v.detach().clone().cpu()) for k, v in initial_state.items()
        )
        self.param_names = list(param_names)
        self.param_shapes = {n: tuple(self.state[n].shape) for n in self.param_names}
        self.buffer_names = [k for k in self.state if k not in set(self.param_names)]
        self.teacher = teacher
        self.sink: RoundSink = sink if sink is not None else MemorySink()
        self.optimizer = ServerSGD(momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.rng = np.random.default_rng(cfg.seed)
        self.nodes = NodeDirectory()
        self.profiles = parse_profiles(cfg.device_profiles)
        self.model_bytes = sum(v.numel() * v.element_size() for v in self.state.values())
        self.policy = PolicyState(cfg, self.profiles, self.model_bytes)
        self.samples_seen = 0
        self.virtual_total = 0.0  # seconds of the virtual clock (device profiles applied)
        self.drawn: dict[int, int] = {}  # partition id -> examples its sampler has drawn so far
        self.round_offset = 0  # rounds completed before this process (resume)
        self.round_lr = 0.0
        self.assigned: dict[int, tuple[int, int]] = {}  # this round: node id -> (partition id, b_i)
        self.round_plan, self.round_steps = RoundPlan(), cfg.local_steps  # this round's teacher plan, local steps H
        self.norm_history: list[float] = []  # the largest accepted |g_i| of each of the last NORM_WINDOW rounds

    def summary(self) -> None:
        """Log the strategy's settings."""
        c = self.cfg
        log(INFO, "\t├──> LargeBatchStrategy: global batch %d, clients/round %s, micro-batch %s",
            c.global_batch_size, c.clients_per_round or "all", c.micro_batch_size or "off")
        log(INFO, "\t├──> server SGD lr %.4g (%s, warm-up %d), momentum %.3g, weight decay %.3g, "
            "local steps %d, teacher %s", c.lr, c.schedule, c.warmup_rounds, c.momentum,
            c.weight_decay, c.local_steps, c.teacher)
        log(INFO, "\t└──> faults: min-batch-fraction %.3g, round-timeout-s %.0f, max-norm-ratio %s",
            c.min_batch_fraction, c.round_timeout_s, c.max_norm_ratio or "off")

    # ----------------------------------------------------------------- configure
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample K clients by partition id and send each its local batch, sampler position and LR."""
        rnd = server_round + self.round_offset
        connected = wait_for_nodes(grid, max(1, self.cfg.clients_per_round), NODE_WAIT_S)
        self.nodes.decide(len(connected), 0 < self.cfg.clients_per_round < len(connected), self.cfg.batch_policy == "fixed")
        usable = self.nodes.refresh(grid, connected, self.cfg.round_timeout_s)
        k = self.cfg.clients_per_round or len(usable)
        if not usable or k > len(usable):
            why = "; ".join(f"node {n}: {r}" for n, r in self.nodes.errors.items() if n in connected)
            raise ConfigError(
                f"run-config key 'clients-per-round' = {self.cfg.clients_per_round}: only {len(usable)} of "
                f"{len(connected)} connected nodes identified themselves with distinct partition ids. {why}"
            )
        self._grid = grid  # its ``destinations`` (server_app/grid.py) attribute replies the SuperLink sent for a node
        sampled = sample_nodes(usable, k, self.rng)
        plan, probe_virtual_s, replanned = self.policy.plan(rnd, usable, grid, self.cfg.round_timeout_s)
        self.virtual_total += probe_virtual_s  # the probe costs the devices time too
        if replanned:
            self.sink.plan(self.policy.batch_plan)
        batches = ([plan[usable[n]] for n in sampled] if plan is not None
                   else split_global_batch(self.cfg.global_batch_size, k))
        self.assigned = {n: (usable[n], b) for n, b in zip(sampled, batches)}
        plan_fn = getattr(self.teacher, "plan", None)
        teacher_plan = plan_fn(rnd, {p: b for p, b in self.assigned.values()}) if plan_fn else RoundPlan()
        self.round_plan, self.round_steps = teacher_plan, teacher_plan.local_steps or self.cfg.local_steps
        teacher_plan.check(self.round_steps, [p for p, _ in self.assigned.values()])
        self.round_lr = teacher_plan.lr if teacher_plan.lr is not None else lr_at(
            rnd, self.cfg.num_server_rounds, self.cfg.lr, self.cfg.warmup_rounds, self.cfg.schedule)
        velocity = velocity_record(teacher_plan, self.param_names, self.optimizer.velocity)
        velocity = ArrayRecord(velocity) if velocity is not None else None
        self._t_sent = time.perf_counter()
        messages = []
        for node_id, (pid, b) in self.assigned.items():
            node_config = ConfigRecord({
                "server-round": rnd,
                "local-batch-size": b,
                "micro-batch-size": self.cfg.micro_batch_size or b,
                "local-steps": self.round_steps,
                "lr": self.round_lr,
                "drawn-examples": self.drawn.get(pid, 0),
                **client_config(teacher_plan, pid, self.cfg.momentum, self.cfg.weight_decay),
            })
            content = RecordDict({"arrays": arrays, "config": node_config})
            if velocity is not None:
                content["velocity"] = velocity
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the ServerApp evaluates the global model centrally."""
        return []

    # ----------------------------------------------------------------- aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, then average the valid gradients by b_i, apply the teacher and the optimizer."""
        rnd = server_round + self.round_offset
        t_recv = time.perf_counter()
        replies = list(replies)
        valid, failures = self.check_replies(rnd, replies)
        planned = sum(b for _, b in self.assigned.values())
        arrived = sum(r.batch for r in valid)
        if failures:
            for f in failures:
                log(WARNING, "round %d: node %s (partition %s) failed: %s", rnd, f["node_id"], f["partition_id"],
                    f["reason"])
            self.sink.failures(failures)
        needed = self.cfg.min_batch_fraction * planned
        if not valid or arrived < needed * (1 - 1e-12):
            names = "; ".join(f"node {f['node_id']} (partition {f['partition_id']}): {f['reason']}" for f in failures)
            raise RoundFailure(
                f"round {rnd}: valid replies cover {arrived} of the {planned} planned examples, below "
                f"min-batch-fraction = {self.cfg.min_batch_fraction:g} ({math.ceil(needed)} needed). "
                f"{len(failures)} of {len(self.assigned)} clients failed: {names}"
            )

        t0 = time.perf_counter()
        grads, batches = [r.grads for r in valid], [r.batch for r in valid]
        global_grad = weighted_mean(grads, batches)
        plan = self.round_plan
        stats = round_stats(plan, global_grad, grads, batches, [r.metrics.get("grad-sq", 0.0) for r in valid],
                            [r.partition_id for r in valid], [r.norm ** 2 for r in valid])
        params = [self.state[name] for name in self.param_names]
        t_teacher = time.perf_counter()
        taught = self.teacher(TeacherInput(
            global_grad, grads, batches, rnd, lr=self.round_lr, params=params,
            weight_decay=self.cfg.weight_decay, stats=stats,
        ))
        teacher_s = time.perf_counter() - t_teacher
        lr = self.round_lr * taught.lr_scale
        momentum = 0.0 if plan.local_momentum else plan.server_momentum
        self.optimizer.momentum = self.cfg.momentum if momentum is None else momentum
        self.optimizer.weight_decay = 0.0 if plan.local_momentum else self.cfg.weight_decay  # the clients applied it
        self._finite_step(rnd, params, taught.grad, lr)
        if plan.local_momentum:
            self.optimizer.velocity = weighted_mean([r.momentum for r in valid], batches)
        if self.buffer_names:
            self.state.update(aggregate_buffers([r.buffers for r in valid], batches))
        server_s = time.perf_counter() - t0

        for r in valid:
            self.drawn[r.partition_id] = self.drawn.get(r.partition_id, 0) + r.batch * self.round_steps
        self.norm_history = (self.norm_history + [max(r.norm for r in valid)])[-NORM_WINDOW:]
        global_batch = sum(batches)
        self.samples_seen += global_batch * self.round_steps
        loss = sum(r.batch * r.metrics["train-loss"] for r in valid) / global_batch
        virtual = [client_virtual_seconds(r.metrics["compute-s"], profile_for(self.profiles, r.partition_id),
                                          self.model_bytes) for r in valid]
        self.virtual_total += max(virtual) + server_s
        self.policy.observe(rnd, stats.b_simple, server_s)
        peaks = [r.metrics["peak-mem-mb"] for r in valid if not math.isnan(r.metrics["peak-mem-mb"])]
        row = {
            "round": rnd, "clients": len(valid), "planned_batch": planned, "failed_clients": len(failures),
            "global_batch": global_batch, "samples_seen": self.samples_seen, "lr": lr, "train_loss": loss,
            "grad_norm": stats.grad_norm, "tr_sigma": stats.tr_sigma, "grad_sq": stats.grad_sq,
            "b_simple": stats.b_simple, "virtual_s": max(virtual) + server_s, "virtual_total_s": self.virtual_total,
            "client_compute_s_max": max(r.metrics["compute-s"] for r in valid),
            "client_peak_mem_mb_max": max(peaks) if peaks else math.nan,
            "round_trip_s": t_recv - self._t_sent, "server_s": server_s, "teacher_time_s": teacher_s,
            **{f"teacher_{k}": v for k, v in ({"scale": 1.0, "noise_norm": 0.0} | taught.metrics).items()},
        }
        clients = [
            {"round": rnd, "node_id": r.node_id, "partition_id": r.partition_id, "local_batch": r.batch,
             "micro_batch": int(r.metrics["micro-batch-size"]), "train_loss": r.metrics["train-loss"],
             "grad_norm": r.norm, "compute_s": r.metrics["compute-s"], "virtual_s": v,
             "budget_mb": r.metrics["budget-mb"], "predicted_peak_mb": r.metrics["predicted-peak-mb"],
             "peak_mem_mb": r.metrics["peak-mem-mb"], "max_batch": int(r.metrics["max-batch"]),
             "startup_s": r.metrics.get("startup-s", math.nan), "setup_s": r.metrics.get("setup-s", math.nan),
             "worker": f"{r.info.get('host', '')}:{r.info.get('pid', '')}", "ray_node": r.info.get("ray-node", "")}
            for r, v in zip(valid, virtual)
        ]
        self.sink.train(row, clients)
        for reply in replies:  # aggregated: Flower's loop holds the list until the next round's replies arrive
            if not reply.has_error():
                for name in list(reply.content.array_records):
                    del reply.content[name]  # (packed on Ray: views into its shared object store, freed now)
        summary = MetricRecord({"train-loss": loss, "global-batch": global_batch, "lr": lr})
        return ArrayRecord(self.state), summary

    def check_replies(self, rnd: int, replies: list[Message]) -> tuple[list[ValidReply], list[dict[str, Any]]]:
        """Split the round's replies into valid ones (ordered by partition) and failure rows.

        Every sampled node must send exactly one reply that passes ``reply_check``; the norm
        guard then runs over the clients that passed everything else.
        """
        by_node: dict[int, list[Message]] = {}
        destinations = getattr(getattr(self, "_grid", None), "destinations", {})
        for m in replies:
            node = destinations.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
            by_node.setdefault(node, []).append(m)
        candidates, failures = [], []

        def fail(node: int, reason: str) -> None:
            pid, b = self.assigned.get(node, (-1, 0))
            pid = self.nodes.partitions.get(node, -1) if pid < 0 else pid  # below 0: not known yet (lazy)
            failures.append({"round": rnd, "node_id": node, "partition_id": pid, "local_batch": b, "reason": reason})

        for node, msgs in by_node.items():
            if node not in self.assigned:
                fail(node, "replied, but was not sampled this round")
            elif len(msgs) > 1:
                fail(node, f"sent {len(msgs)} replies to one message")
            elif msgs[0].has_error():
                fail(node, f"client error: {msgs[0].error.reason}")
            else:
                reply = self._check_one(node, msgs[0])
                if isinstance(reply, str):
                    fail(node, reply)
                else:
                    candidates.append(reply)
        for node in self.assigned:
            if node not in by_node:
                fail(node, f"no reply within round-timeout-s = {self.cfg.round_timeout_s:g} s")
                self.nodes.quarantine(node)
        recent = max(self.norm_history, default=0.0)
        outliers = norm_outliers([r.norm for r in candidates], self.cfg.max_norm_ratio, recent)
        for r, out in zip(candidates, outliers):
            if out:
                reference = max(max(c.norm for c in candidates if c is not r), recent)
                fail(r.node_id, f"gradient norm {r.norm:.4g} is {r.norm / reference:.3g} times the reference "
                     f"{reference:.4g} (the largest other client's, or of the last {NORM_WINDOW} rounds; "
                     f"max-norm-ratio = {self.cfg.max_norm_ratio:g})")
        valid = sorted((r for r, out in zip(candidates, outliers) if not out), key=lambda r: r.partition_id)
        return valid, sorted(failures, key=lambda f: (f["partition_id"], f["node_id"]))

    def _check_one(self, node: int, msg: Message) -> ValidReply | str:
        """A ``ValidReply``, or the reason this reply is invalid."""
        pid, b = self.assigned[node]
        try:
            content = msg.content
            if "grads" not in content.array_records or "metrics" not in content.metric_records:
                return "the reply lacks its 'grads' ArrayRecord or its 'metrics' MetricRecord"
            grads = record_tensors(content["grads"], copy=False)  # 100 replies of 1.6 MB: a copy costs ~80 ms a round
            buffers = record_tensors(content["buffers"]) if "buffers" in content.array_records else None
            metrics = dict(content["metrics"])
            info = {k: str(v)[:64] for k, v in content["info"].items()} if "info" in content.config_records else {}
        except Exception as err:  # noqa: BLE001 - whatever a client sent, it must not crash the server
            return f"unreadable reply ({type(err).__name__}: {err})"
        if pid < 0:  # a lazy directory learns the node's partition from its first reply
            claimed = metrics.get("partition-id")
            if isinstance(claimed, bool) or not isinstance(claimed, int) or claimed < 0:
                return f"partition-id = {claimed!r}: a non-negative integer is needed"
            if (refused := self.nodes.learn(node, claimed, -1)) is not None:
                return refused
            pid = claimed
        expected = Expected(self.param_shapes, {k: self.state[k] for k in self.buffer_names}, b,
                            self.round_steps, pid)
        plan = self.round_plan
        momentum = record_tensors(content["momentum"], copy=False) if "momentum" in content.array_records else {}
        sq_norms: list[float] = []
        reason = (check_metrics(metrics, expected) or check_tensors("gradient", grads, self.param_shapes, sq_norms)
                  or check_buffers(buffers, expected)
                  or (check_tensors("momentum", momentum, self.param_shapes) if plan.local_momentum else None)
                  or (check_grad_sq(metrics) if plan.grad_scale is not None else None))
        if reason:
            return reason
        ordered = [grads[n] for n in self.param_names]
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        velocity = [momentum[n] for n in self.param_names] if plan.local_momentum else None
        return ValidReply(node, pid, b, ordered, buffers, numbers, math.sqrt(sum(sq_norms)), info, velocity)

    def _finite_step(self, rnd: int, params: list[torch.Tensor], grad: list[torch.Tensor], lr: float) -> None:
        """Apply the optimizer; undo it and raise ``DivergenceError`` if a weight became non-finite."""
        before = [p.clone() for p in params]
        velocity = None if self.optimizer.velocity is None else [v.clone() for v in self.optimizer.velocity]
        self.optimizer.step(params, grad, lr)
        if all(bool(torch.isfinite(p).all()) for p in params):
            return
        for p, b in zip(params, before):
            p.copy_(b)
        self.optimizer.velocity = velocity
        bad = [n for n, g in zip(self.param_names, grad) if not bool(torch.isfinite(g).all())]
        raise DivergenceError(
            f"round {rnd}: the server step would make the global model non-finite (lr = {lr:.4g}"
            f"{', non-finite teacher output in ' + ', '.join(bad[:3]) if bad else ''}). The step was undone; "
            "the run stops with the model of the previous round, and checkpoint.pt keeps the last checkpoint. "
            "A smaller lr (or a longer warmup-rounds) usually helps."
        )

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything the strategy needs to continue exactly where it is (see ``load_state_dict``)."""
        return {
            "model": OrderedDict((k, v.clone()) for k, v in self.state.items()),
            "velocity": None if self.optimizer.velocity is None else [v.clone() for v in self.optimizer.velocity],
            "teacher": teacher_state(self.teacher),
            "rng": self.rng.bit_generator.state,
            "samples_seen": self.samples_seen,
            "virtual_total": self.virtual_total,
            "drawn": dict(self.drawn),
            "norm_history": list(self.norm_history),
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], completed_rounds: int) -> None:
        """Continue after ``completed_rounds`` rounds from a ``state_dict``."""
        self.state = OrderedDict((k, v.clone()) for k, v in state["model"].items())
        self.optimizer.velocity = None if state["velocity"] is None else [v.clone() for v in state["velocity"]]
        load_teacher_state(self.teacher, state["teacher"])
        self.rng.bit_generator.state = state["rng"]
        self.samples_seen, self.virtual_total = int(state["samples_seen"]), float(state["virtual_total"])
        self.drawn = {int(k): int(v) for k, v in state["drawn"].items()}
        self.norm_history = [float(n) for n in state.get("norm_history", [])]
        self.policy.load_state_dict(state["policy"])
        self.round_offset = completed_rounds

