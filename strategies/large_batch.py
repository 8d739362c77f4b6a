"""The Flower strategy for synchronous large-global-batch training (thin glue).

Each round: sample K clients, send client i the global weights and its own config (local
batch b_i, micro-batch size, local steps, learning rate), collect one gradient per client,
average them weighted by b_i into the gradient of the global batch B = sum_i b_i
(strategies/aggregation.py), pass it through the teacher (strategies/teachers.py) and apply
the server optimizer (strategies/server_opt.py). With ``local-steps`` H > 1 the clients
return pseudo-gradients (w_0 - w_H) / lr instead, which makes FedAvg-style baselines the same
code path.

Only ``configure_train``, ``aggregate_train`` and ``summary`` are overridden; ``start`` is
Flower's. Client-side federated evaluation is off; the ServerApp evaluates centrally.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from estimators.performance import client_virtual_seconds
from strategies.aggregation import aggregate_buffers, weighted_mean
from strategies.batch_policy import ClientCapacity, memory_max_plan, optimal_plan, probe_clients
from strategies.noise_scale import noise_stats
from strategies.server_opt import ServerSGD, lr_at
from strategies.teachers import TeacherInput, TeacherOutput
from workloads.config import ConfigError, RunConfig, split_global_batch
from workloads.devices import parse_profiles, profile_for

NODE_WAIT_S = 300.0  # how long to wait for clients-per-round nodes before failing


class ClientFailure(RuntimeError):
    """A client replied with an error: the global batch would be incomplete."""


class LargeBatchStrategy(FedAvg):
    """Synchronous large-global-batch SGD with a teacher hook.

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
    """

    def __init__(
        self,
        cfg: RunConfig,
        initial_state: dict[str, torch.Tensor],
        param_names: list[str],
        teacher: Callable[[TeacherInput], TeacherOutput],
    ) -> None:
        super().__init__(min_train_nodes=1, min_available_nodes=1)
        self.cfg = cfg
        self.state: OrderedDict[str, torch.Tensor] = OrderedDict(
            (k, v.detach().clone().cpu()) for k, v in initial_state.items()
        )
        self.param_names = list(param_names)
        self.buffer_names = [k for k in self.state if k not in set(self.param_names)]
        self.teacher = teacher
        self.optimizer = ServerSGD(momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.rng = np.random.default_rng(cfg.seed)
        self.samples_seen = 0
        self.round_lr = 0.0
        self.last_round: dict[str, Any] = {}  # summary of the last aggregated round
        self.client_rows: list[dict[str, Any]] = []  # one row per client per round
        self.profiles = parse_profiles(cfg.device_profiles)
        self.model_bytes = sum(v.numel() * v.element_size() for v in self.state.values())
        self.virtual_total = 0.0  # seconds of the virtual clock (device profiles applied)
        self.capacities: list[ClientCapacity] | None = None  # capacity probe (adaptive batch policies)
        self.plan: dict[int, int] | None = None  # b_i per node id under an adaptive policy
        self.batch_plan: dict[str, Any] = {}  # what the policy chose and why (batch_plan.json)
        self.calibration: list[tuple[float, float]] = []  # (b_simple, server_s) of calibration rounds

    def summary(self) -> None:
        """Log the strategy's settings."""
        c = self.cfg
        log(INFO, "\t├──> LargeBatchStrategy: global batch %d, clients/round %s, micro-batch %s",
            c.global_batch_size, c.clients_per_round or "all", c.micro_batch_size or "off")
        log(INFO, "\t└──> server SGD lr %.4g (%s, warm-up %d), momentum %.3g, weight decay %.3g, "
            "local steps %d, teacher %s", c.lr, c.schedule, c.warmup_rounds, c.momentum,
            c.weight_decay, c.local_steps, c.teacher)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample K clients and send each its local batch size and the round's LR."""
        nodes = _wait_for_nodes(grid, max(1, self.cfg.clients_per_round))
        k = self.cfg.clients_per_round or len(nodes)
        if k > len(nodes):
            raise ConfigError(
                f"run-config key 'clients-per-round' = {k}: only {len(nodes)} nodes are connected."
            )
        # Choose positions, not ids: node ids are uint64 and numpy would turn a mix into float64.
        sampled = sorted(nodes[int(i)] for i in self.rng.choice(len(nodes), size=k, replace=False))
        plan = self._policy_plan(server_round, nodes, grid)
        batches = [plan[n] for n in sampled] if plan else split_global_batch(self.cfg.global_batch_size, k)
        self.round_lr = lr_at(server_round, self.cfg.num_server_rounds, self.cfg.lr,
                              self.cfg.warmup_rounds, self.cfg.schedule)
        self._t_sent = time.perf_counter()
        messages = []
        for node_id, b in zip(sampled, batches):
            node_config = ConfigRecord({
                "server-round": server_round,
                "local-batch-size": b,
                "micro-batch-size": self.cfg.micro_batch_size or b,
                "local-steps": self.cfg.local_steps,
                "lr": self.round_lr,
            })
            content = RecordDict({"arrays": arrays, "config": node_config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        return messages

    def _policy_plan(self, server_round: int, nodes: list[int], grid: Grid) -> dict[int, int] | None:
        """b_i per node id under ``batch-policy`` (None: the fixed even split this round)."""
        policy = self.cfg.batch_policy
        if policy == "fixed":
            return None
        if self.capacities is not None and {c.node_id for c in self.capacities} != set(nodes):
            log(INFO, "batch policy %s: the connected nodes changed; probing and planning again", policy)
            self.capacities = self.plan = None
        if self.capacities is None:
            t0 = time.perf_counter()
            self.capacities = probe_clients(grid, nodes, self.profiles, self.model_bytes)
            probe_virtual_s = max(c.probe_s for c in self.capacities)
            self.virtual_total += probe_virtual_s  # the probe costs the devices time too
            self.batch_plan = {"policy": policy, "probe_s": time.perf_counter() - t0, "probe_virtual_s": probe_virtual_s, "clients": [
                {"node_id": c.node_id, "partition_id": c.partition_id, "max_batch": c.max_batch, "comm_s": c.comm_s,
                 "step_s_at_max": float(c.step_model(c.max_batch))} for c in self.capacities]}
            log(INFO, "batch policy %s: probed %d clients in %.1f s; memory limits %s", policy,
                len(self.capacities), self.batch_plan["probe_s"], [c.max_batch for c in self.capacities])
        if policy == "memory-max":
            self.plan = self.plan or memory_max_plan(self.capacities)
            return self.plan
        if server_round <= self.cfg.calibration_rounds:
            return None
        if self.plan is None:
            noise = [b for b, _ in self.calibration if np.isfinite(b) and b > 0]
            noise_scale = float(np.median(noise)) if noise else float(self.cfg.global_batch_size)
            server_s = float(np.median([t for _, t in self.calibration])) if self.calibration else 0.0
            self.plan, choice = optimal_plan(self.capacities, noise_scale, server_s, self.cfg.batch_objective)
            self.batch_plan |= {"noise_scale": noise_scale, "noise_measured": bool(noise), "server_s": server_s,
                                "objective": self.cfg.batch_objective, "global_batch": choice.global_batch,
                                "split": {str(n): b for n, b in self.plan.items()}, "predicted_round_s": choice.round_s,
                                "candidates": [dict(zip(("B", "round_s", "rel_time", "rel_cost"), row)) for row in choice.table]}
            log(INFO, "batch policy optimal (%s): B_noise %.0f%s -> global batch %d, split %s, predicted round %.3f s",
                self.cfg.batch_objective, noise_scale, "" if noise else " (not measured: global-batch-size)",
                choice.global_batch, choice.split, choice.round_s)
        return self.plan

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the ServerApp evaluates the global model centrally."""
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average gradients by b_i, apply the teacher and the server optimizer."""
        replies = list(replies)
        t_recv = time.perf_counter()
        failed = [m for m in replies if m.has_error()]
        if failed or not replies:
            reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed)
            raise ClientFailure(
                f"round {server_round}: {len(failed)} of {len(replies)} clients failed, so the "
                f"global batch is incomplete. {reasons or 'No replies arrived.'}"
            )
        grads, buffers, batches, metrics = [], [], [], []
        for m in replies:
            g = m.content["grads"].to_torch_state_dict()
            grads.append([g[name] for name in self.param_names])
            if self.buffer_names:
                buffers.append(m.content["buffers"].to_torch_state_dict())
            mr = m.content["metrics"]
            batches.append(int(mr["num-examples"]))
            metrics.append({k: float(v) for k, v in mr.items()} | {"node-id": m.metadata.src_node_id})

        t0 = time.perf_counter()
        global_grad = weighted_mean(grads, batches)
        stats = noise_stats(global_grad, grads, batches)
        params = [self.state[name] for name in self.param_names]
        t_teacher = time.perf_counter()
        taught = self.teacher(TeacherInput(
            global_grad, grads, batches, server_round, lr=self.round_lr, params=params,
            weight_decay=self.cfg.weight_decay, stats=stats,
        ))
        teacher_s = time.perf_counter() - t_teacher
        lr = self.round_lr * taught.lr_scale
        self.optimizer.step(params, taught.grad, lr)
        for name, value in aggregate_buffers(buffers, batches).items():
            self.state[name] = value
        server_s = time.perf_counter() - t0

        global_batch = sum(batches)
        self.samples_seen += global_batch * self.cfg.local_steps
        loss = sum(b * m["train-loss"] for b, m in zip(batches, metrics)) / global_batch
        virtual = [client_virtual_seconds(m["compute-s"], profile_for(self.profiles, int(m["partition-id"])),
                                          self.model_bytes) for m in metrics]
        self.virtual_total += max(virtual) + server_s
        if self.cfg.batch_policy == "optimal" and server_round <= self.cfg.calibration_rounds:
            self.calibration.append((stats.b_simple, server_s))
        self.last_round = {
            "round": server_round,
            "clients": len(replies),
            "global_batch": global_batch,
            "samples_seen": self.samples_seen,
            "lr": lr,
            "train_loss": loss,
            "grad_norm": stats.grad_norm,
            "tr_sigma": stats.tr_sigma,
            "grad_sq": stats.grad_sq,
            "b_simple": stats.b_simple,
            "virtual_s": max(virtual) + server_s,
            "virtual_total_s": self.virtual_total,
            "client_compute_s_max": max(m["compute-s"] for m in metrics),
            "client_peak_mem_mb_max": max(m["peak-mem-mb"] for m in metrics),
            "round_trip_s": t_recv - self._t_sent,
            "server_s": server_s,
            "teacher_time_s": teacher_s,
            **{f"teacher_{k}": v for k, v in ({"scale": 1.0, "noise_norm": 0.0} | taught.metrics).items()},
        }
        self.client_rows += [
            {"round": server_round, "node_id": m["node-id"], "partition_id": int(m["partition-id"]),
             "local_batch": int(m["num-examples"]), "micro_batch": int(m["micro-batch-size"]),
             "train_loss": m["train-loss"], "compute_s": m["compute-s"], "virtual_s": v,
             "budget_mb": m["budget-mb"], "predicted_peak_mb": m["predicted-peak-mb"], "peak_mem_mb": m["peak-mem-mb"],
             "max_batch": int(m["max-batch"])}
            for m, v in zip(metrics, virtual)
        ]
        summary = MetricRecord({"train-loss": loss, "global-batch": global_batch, "lr": lr})
        return ArrayRecord(self.state), summary


def _wait_for_nodes(grid: Grid, minimum: int, timeout_s: float = NODE_WAIT_S) -> list[int]:
    """Return the connected node ids once at least ``minimum`` are connected."""
    start = last_log = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        now = time.monotonic()
        if now - start > timeout_s:
            raise ConfigError(
                f"run-config key 'clients-per-round' = {minimum}: only {len(nodes)} nodes "
                f"connected within {timeout_s:.0f} s."
            )
        if now - last_log > 10:
            log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), minimum)
            last_log = now
        time.sleep(0.5)
    return nodes
