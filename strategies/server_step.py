"""One round of the server as functions of typed values: ``plan_round``, then ``server_step``.

``plan_round(state, setup, usable, k, batches)`` draws the round's K clients by partition id,
assigns their local batches b_i and asks the teacher for its ``RoundPlan``
(strategies/round_plan.py). ``server_step(state, replies, plan)`` checks every reply
(strategies/reply_check.py), averages the valid gradients weighted by b_i into the gradient of
the global batch (strategies/aggregation.py; or a robust rule, strategies/robust.py), passes it
through the teacher (strategies/teachers.py) and applies the server optimizer
(strategies/server_opt.py). With H > 1 local steps the clients return pseudo-gradients
(w_0 - w_H) / lr instead, which makes FedAvg-style baselines the same code path.
With client-level DP (``dp-clip-norm`` > 0) the mean is the clipped, noised, fixed-denominator
mean of strategies/privacy.py, and each round adds a step to the Opacus accountant's history.

The values they pass (``RunSetup``, ``StepPlan``, ``ClientReply``, ``ReplyCheck``,
``StepRecord``) are in strategies/step_values.py. Both take a ``ServerState``
(strategies/server_state.py) and return the next one, leaving the one they were given as it
was; neither sees a Flower object: the replies are ``ClientReply`` values, which the Flower
strategy (strategies/large_batch.py) reads from its messages. The teacher is an object, but its
state lives in ``ServerState.teacher``: it is loaded into the teacher before each use and read
back after.

Faults: an invalid, failed or late reply drops that client from the round; the step is then
the exact mean over the examples that did arrive, B' = sum of their b_i, as long as B' is at
least ``min-batch-fraction`` of the planned B (else ``RoundFailure``, which ``skip_round`` turns
into a skipped round, up to ``max-failed-rounds`` in a row). A step that would make the
weights non-finite raises ``DivergenceError``, and the state stays the previous round's. Both
errors carry the round's ``ReplyCheck``, so that the failures can still be recorded.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from estimators.performance import client_virtual_seconds
from protocol import messages as proto
from strategies.aggregation import aggregate_buffers, weighted_mean
from strategies.nodes import sample_nodes
from strategies.noise_scale import NoiseStats
from strategies.privacy import (
    add_step, dp_on, epsilon, noise_generator, noise_seed, private_mean, round_noise_multiplier,
)
from strategies.reply_check import (
    NORM_WINDOW, Expected, check_buffers, check_grad_sq, check_metrics, check_tensors, norm_outliers,
)
from strategies.persistence import update as update_persistence
from strategies.robust import flatten, worker_momenta
from strategies.round_plan import round_stats
from strategies.server_opt import ServerSGD, lr_at, velocity_from_weights
from strategies.server_state import ServerState
from strategies.tail_average import with_average
from strategies.step_values import (  # noqa: F401 - the round's values, imported from here too
    ClientReply, DivergenceError, ReplyCheck, RoundFailure, RunSetup, StepError, StepPlan, StepRecord, ValidReply,
    refused_by_config,
)
from strategies.teachers import TeacherInput, TeacherOutput
from workloads.batches import split_global_batch
from workloads.devices import profile_for


def plan_round(state: ServerState, setup: RunSetup, usable: Mapping[int, int], k: int,
               batches: Mapping[int, int] | None = None) -> tuple[ServerState, StepPlan]:
    """Round ``state.round + 1``: draw ``k`` of the ``usable`` nodes (node id -> partition id) and plan it.

    ``batches`` gives b_i per partition (a batch policy's plan); None splits ``global-batch-size``
    evenly. Returns the state with the sampler and the teacher advanced, and the round's plan.
    """
    cfg, rnd = setup.cfg, state.round + 1
    rng = state.sampler()
    if state.persistence.excluded:  # exclude-ratio: excluded partitions are no longer sampled
        usable = {n: p for n, p in usable.items() if p not in state.persistence.excluded}
        k = min(k, len(usable))
    sampled = sample_nodes(usable, k, rng)
    sizes = [batches[usable[n]] for n in sampled] if batches is not None else split_global_batch(cfg.global_batch_size, k)
    assigned = {n: (usable[n], b) for n, b in zip(sampled, sizes)}
    teacher = setup.teacher
    teacher.load_state_dict(state.teacher)
    teacher_plan = teacher.plan(rnd, {p: b for p, b in assigned.values()})
    steps = teacher_plan.local_steps or cfg.local_steps
    teacher_plan.check(steps, [p for p, _ in assigned.values()])
    lr = teacher_plan.lr if teacher_plan.lr is not None else lr_at(
        rnd, cfg.num_server_rounds, cfg.lr, cfg.warmup_rounds, cfg.schedule)
    q = k / len(usable)
    state = dataclasses.replace(state, rng=rng.bit_generator.state, teacher=teacher.state_dict())
    if dp_on(cfg):  # z and the noise seed: chosen in round 1, then kept
        z = round_noise_multiplier(cfg, state.dp_noise_multiplier, q)
        state = dataclasses.replace(state, dp_noise_multiplier=z, dp_noise_seed=noise_seed(cfg, state.dp_noise_seed))
    return state, StepPlan(setup, rnd, assigned, lr, steps, teacher_plan, sample_rate=q)


def check_replies(replies: Sequence[ClientReply], plan: StepPlan, state: ServerState) -> ReplyCheck:
    """Split the round's replies into valid ones and failure rows.

    Every sampled node must send exactly one reply that passes ``reply_check``; the norm guard
    then runs over the clients that passed everything else.
    """
    by_node: dict[int, list[ClientReply]] = {}
    for r in replies:
        by_node.setdefault(r.node_id, []).append(r)
    candidates: list[ValidReply] = []
    failures: list[dict[str, Any]] = []

    def fail(node: int, reason: str, known: int = -1) -> None:
        pid, b = plan.assigned.get(node, (-1, 0))
        failures.append({"round": plan.round, "node_id": node, "partition_id": known if pid < 0 else pid,
                         "local_batch": b, "reason": reason})

    for node, group in by_node.items():
        first = group[0]
        if node not in plan.assigned:
            fail(node, "replied, but was not sampled this round", first.partition_id)
        elif len(group) > 1:
            fail(node, f"sent {len(group)} replies to one message", first.partition_id)
        elif first.error is not None:
            fail(node, first.error, first.partition_id)
        elif isinstance(checked := _check_reply(first, plan, state), str):
            fail(node, checked, first.partition_id)
        else:
            candidates.append(checked)
    missing = [node for node in plan.assigned if node not in by_node]
    for node in missing:
        fail(node, f"no reply within round-timeout-s = {plan.setup.cfg.round_timeout_s:g} s")
    cfg = plan.setup.cfg  # under DP the clip bounds every client and the guard is off (docs/differential-privacy.md)
    max_ratio, recent = (0.0 if dp_on(cfg) else cfg.max_norm_ratio), max(state.norm_history, default=0.0)
    outliers = norm_outliers([r.norm for r in candidates], max_ratio, recent)
    for r, out in zip(candidates, outliers):
        if out:
            reference = max(max(c.norm for c in candidates if c is not r), recent)
            fail(r.node_id, f"gradient norm {r.norm:.4g} is {r.norm / reference:.3g} times the reference "
                 f"{reference:.4g} (the largest other client's, or of the last {NORM_WINDOW} rounds; "
                 f"max-norm-ratio = {max_ratio:g})", r.partition_id)
    valid = sorted((r for r, out in zip(candidates, outliers) if not out), key=lambda r: r.partition_id)
    return ReplyCheck(valid, sorted(failures, key=lambda f: (f["partition_id"], f["node_id"])), missing)


def _check_reply(reply: ClientReply, plan: StepPlan, state: ServerState) -> ValidReply | str:
    """A ``ValidReply``, or the reason this sampled node's one reply is invalid."""
    setup, tp = plan.setup, plan.teacher_plan
    pid, b = plan.assigned[reply.node_id]
    pid = reply.partition_id if pid < 0 else pid  # a lazy directory learned it from this reply
    expected = Expected(setup.param_shapes, {k: state.model[k] for k in setup.buffer_names}, b, plan.local_steps, pid)
    sq_norms: list[float] = []
    reason = (check_metrics(reply.metrics, expected)
              or check_tensors("gradient", reply.grads, setup.param_shapes, sq_norms)
              or check_buffers(reply.buffers, expected)
              or (check_tensors("velocity", reply.velocity, setup.param_shapes) if tp.replies_velocity else None)
              or (check_grad_sq(reply.metrics) if tp.grad_scale is not None else None))
    if reason:
        return reason
    numbers = {k: float(v) for k, v in reply.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    velocity = [reply.velocity[n] for n in setup.param_names] if tp.replies_velocity else None
    return ValidReply(reply.node_id, pid, b, [reply.grads[n] for n in setup.param_names], reply.buffers, numbers,
                      math.sqrt(sum(sq_norms)), reply.info, velocity)


def server_step(state: ServerState, replies: Sequence[ClientReply], plan: StepPlan, *,
                received_at: float | None = None) -> tuple[ServerState, StepRecord]:
    """Check the replies, average the valid gradients by b_i, apply the teacher and the optimizer.

    ``received_at`` (``time.perf_counter()``, default: now) is when the replies arrived, for the
    record's ``round_trip_s``. Raises ``RoundFailure`` or ``DivergenceError`` (module docstring).
    """
    received_at = time.perf_counter() if received_at is None else received_at
    setup, tp = plan.setup, plan.teacher_plan
    check = check_replies(replies, plan, state)
    _require_enough(check, plan)
    t0 = time.perf_counter()
    valid = check.valid
    batches = [r.batch for r in valid]
    grads, global_grad, privacy = _mean(state, plan, valid)
    stats = round_stats(tp, global_grad, grads, batches, [r.metrics.get(proto.GRAD_SQ, 0.0) for r in valid],
                        [r.partition_id for r in valid], [r.norm ** 2 for r in valid])
    params = [state.model[name] for name in setup.param_names]
    direction, momenta = _aggregate(state, plan, grads, batches, [r.partition_id for r in valid], params, global_grad)
    persistence = state.persistence
    if setup.cfg.exclude_ratio:  # counts this round's gradients; a newly excluded client is left out from the next
        persistence = update_persistence(persistence, [r.partition_id for r in valid],
                                         torch.stack([flatten(g) for g in grads]), setup.cfg.exclude_ratio,
                                         setup.cfg.exclude_after)
    taught, teacher_state, teacher_s = _teach(state, plan, TeacherInput(
        direction, grads, batches, plan.round, lr=plan.lr, params=params, weight_decay=setup.cfg.weight_decay,
        stats=stats))
    lr = plan.lr * taught.lr_scale
    start = params
    params, velocity = _finite_step(state, plan, params, taught.grad, lr, check)
    if tp.replies_velocity:
        velocity = weighted_mean([r.velocity for r in valid], batches)
    elif tp.local_momentum:  # teacher-velocity = from-weights: the clients' mean weights are the new params
        velocity = velocity_from_weights(start, params, state.velocity, tp.local_lrs or (plan.lr,) * plan.local_steps,
                                         setup.cfg.momentum)
    elif setup.aggregator.name == "centered-clip":
        velocity = direction  # the next round's center
    model = OrderedDict(state.model)
    model.update(zip(setup.param_names, params))
    if setup.buffer_names:
        model.update(aggregate_buffers([r.buffers for r in valid], batches))
    server_s = time.perf_counter() - t0

    drawn, virtual, virtual_s = round_progress(state, plan, valid, server_s)
    state = dataclasses.replace(
        state, model=model, velocity=velocity, teacher=teacher_state, drawn=drawn, round=plan.round,
        client_momentum=momenta, failed_rounds=0, dp_history=_dp_history(state, plan), persistence=persistence,
        norm_history=(*state.norm_history, max(r.norm for r in valid))[-NORM_WINDOW:],
        samples_seen=state.samples_seen + sum(batches) * plan.local_steps, virtual_total=state.virtual_total + virtual_s,
        policy=state.policy.observe(setup.cfg, plan.round, stats, server_s))
    state = with_average(state, setup.cfg)
    timing = {"virtual_s": virtual_s, "round_trip_s": received_at - plan.sent_at, "server_s": server_s,
              "teacher_time_s": teacher_s}
    return state, StepRecord(_round_row(state, plan, check, stats, taught, lr, timing) | privacy
                             | _dp_epsilon(state, plan), _client_rows(plan, valid, virtual), check)


def skip_round(state: ServerState, plan: StepPlan, failure: RoundFailure) -> tuple[ServerState, StepRecord]:
    """The round ``failure`` ended, skipped: the model unchanged, the round counted (``max-failed-rounds``).

    The state keeps what ``plan_round`` advanced (sampler, teacher), so a resumed run skips the
    same rounds. Raises ``failure`` again, with the limit named, when this is one round more
    than ``max-failed-rounds`` in a row, or at once when no reply was valid and every client
    refused with a ``ConfigError``.
    """
    limit, streak = plan.setup.cfg.max_failed_rounds, state.failed_rounds + 1
    check = failure.check
    if not check.valid and check.failures and all(refused_by_config(f["reason"]) for f in check.failures):
        raise RoundFailure(f"{failure} Every client refused the round with a ConfigError: skipping rounds cannot "
                           "help.", check)
    if streak > limit:
        raise RoundFailure(f"{failure} That is {streak} consecutive short rounds; max-failed-rounds = {limit}.",
                           failure.check)
    setup = plan.setup
    virtual_s = max(_virtual_seconds(setup, check.valid), default=0.0)
    virtual_s += setup.cfg.round_latency_s  # the round took its time, though it changed nothing
    state = dataclasses.replace(state, round=plan.round, failed_rounds=streak,
                                virtual_total=state.virtual_total + virtual_s, dp_history=_dp_history(state, plan))
    row = {"round": plan.round, "skipped": 1, "clients": len(check.valid), "planned_batch": plan.planned,
           "failed_clients": len(check.failures), "global_batch": 0, "samples_seen": state.samples_seen, "lr": 0.0,
           "train_loss": math.nan, "virtual_s": virtual_s, "virtual_total_s": state.virtual_total}
    return state, StepRecord(row | _dp_epsilon(state, plan), [], check)


def _mean(state: ServerState, plan: StepPlan, valid: Sequence[ValidReply]
          ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], dict[str, float]]:
    """The client gradients the round uses, their mean G and the DP columns of rounds.csv.

    DP off: G = sum_i b_i g_i / sum_i b_i. DP on: the clipped g_i and the noised fixed-denominator
    mean of strategies/privacy.py, with the noise drawn from the run's noise seed and the round.
    """
    grads, batches, cfg = [r.grads for r in valid], [r.batch for r in valid], plan.setup.cfg
    if not dp_on(cfg):
        return grads, weighted_mean(grads, batches), {}
    z, clip = state.dp_noise_multiplier, cfg.dp_clip_norm
    mean, clipped, sigma = private_mean(grads, batches, [b for _, b in plan.assigned.values()], clip, z,
                                        noise_generator(state.dp_noise_seed, plan.round))
    over = [r.metrics.get(proto.PRE_CLIP_NORM, r.norm) > clip for r in valid]
    return clipped, mean, {"dp_noise_multiplier": z, "dp_sample_rate": plan.sample_rate, "dp_noise_std": sigma,
                           "dp_clipped_fraction": sum(over) / len(over)}


def _dp_history(state: ServerState, plan: StepPlan) -> tuple[tuple[float, float, int], ...]:
    """The accountant's history after this round (every round counts, a skipped one too: conservative)."""
    if not dp_on(plan.setup.cfg):
        return state.dp_history
    return add_step(state.dp_history, state.dp_noise_multiplier, plan.sample_rate)


def _dp_epsilon(state: ServerState, plan: StepPlan) -> dict[str, float]:
    """``dp_epsilon`` at ``dp-delta`` after the round (``state`` is the state after it); {} with DP off."""
    cfg = plan.setup.cfg
    return {"dp_epsilon": epsilon(state.dp_history, cfg.dp_delta, cfg.dp_accountant)} if dp_on(cfg) else {}


def round_progress(state: ServerState, plan: StepPlan, valid: Sequence[ValidReply],
                   server_s: float) -> tuple[dict[int, int], list[float], float]:
    """A taken step's examples drawn per partition, each client's virtual s, and the round's virtual s."""
    drawn = dict(state.drawn)
    for r in valid:
        drawn[r.partition_id] = drawn.get(r.partition_id, 0) + r.batch * plan.local_steps
    virtual = _virtual_seconds(plan.setup, valid)
    return drawn, virtual, max(virtual) + server_s + plan.setup.cfg.round_latency_s


def _virtual_seconds(setup: RunSetup, valid: Sequence[ValidReply]) -> list[float]:
    """Each valid client's seconds on its simulated device (its profile's speed and link)."""
    return [client_virtual_seconds(r.metrics[proto.COMPUTE_S], profile_for(setup.profiles, r.partition_id),
                                   setup.model_bytes) for r in valid]


def _aggregate(state: ServerState, plan: StepPlan, grads: list[list[torch.Tensor]], batches: list[int],
               partitions: list[int], params: list[torch.Tensor], mean: list[torch.Tensor]
               ) -> tuple[list[torch.Tensor], Mapping[int, list[torch.Tensor]]]:
    """The round's direction (``aggregator``; ``mean`` is the exact step) and the clients' momenta after it.

    ``centered-clip`` clips each client's momentum m_i = beta * m_i + g_i + wd * w (the server's
    momentum and weight decay move into the clients' momenta) around the previous direction.
    """
    aggregator, cfg = plan.setup.aggregator, plan.setup.cfg
    if aggregator.name == "mean":
        return mean, state.client_momentum
    seed = cfg.seed * 1_000_003 + plan.round  # bucket-size: the buckets' order, the same on a resumed run
    if aggregator.name != "centered-clip":
        return aggregator(grads, batches, seed=seed), state.client_momentum
    if cfg.weight_decay:
        grads = [[g.to(torch.float32) + cfg.weight_decay * p for g, p in zip(gi, params)] for gi in grads]
    momenta = worker_momenta(grads, partitions, cfg.momentum, state.client_momentum, state.velocity)
    direction = aggregator([momenta[p] for p in partitions], batches, state.velocity, seed)
    return direction, {**state.client_momentum, **momenta}


def _require_enough(check: ReplyCheck, plan: StepPlan) -> None:
    """Raise ``RoundFailure`` unless the valid replies cover ``min-batch-fraction`` of the planned examples."""
    fraction, planned = plan.setup.cfg.min_batch_fraction, plan.planned
    arrived, needed = sum(r.batch for r in check.valid), fraction * planned
    if check.valid and arrived >= needed * (1 - 1e-12):
        return
    names = "; ".join(f"node {f['node_id']} (partition {f['partition_id']}): {f['reason']}" for f in check.failures)
    raise RoundFailure(
        f"round {plan.round}: valid replies cover {arrived} of the {planned} planned examples, below "
        f"min-batch-fraction = {fraction:g} ({math.ceil(needed)} needed). "
        f"{len(check.failures)} of {len(plan.assigned)} clients failed: {names}", check)


def _teach(state: ServerState, plan: StepPlan, inp: TeacherInput) -> tuple[TeacherOutput, dict, float]:
    """The teacher's output with its state from ``state``, its state after, and the seconds it took."""
    teacher = plan.setup.teacher
    teacher.load_state_dict(state.teacher)
    start = time.perf_counter()
    taught = teacher(inp)
    seconds = time.perf_counter() - start
    return taught, teacher.state_dict(), seconds


def _finite_step(state: ServerState, plan: StepPlan, params: list[torch.Tensor], grad: list[torch.Tensor],
                 lr: float, check: ReplyCheck) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """New parameters and velocity after the optimizer step; ``DivergenceError`` if a weight became non-finite."""
    new = [p.clone() for p in params]
    velocity = None if state.velocity is None else [v.clone() for v in state.velocity]
    optimizer = ServerSGD(momentum=plan.momentum, weight_decay=plan.weight_decay, velocity=velocity)
    optimizer.step(new, grad, lr)
    if all(bool(torch.isfinite(p).all()) for p in new):
        return new, optimizer.velocity
    bad = [n for n, g in zip(plan.setup.param_names, grad) if not bool(torch.isfinite(g).all())]
    raise DivergenceError(
        f"round {plan.round}: the server step would make the global model non-finite (lr = {lr:.4g}"
        f"{', non-finite teacher output in ' + ', '.join(bad[:3]) if bad else ''}). The step was not applied; "
        "the run stops with the model of the previous round, and checkpoint.pt keeps the last checkpoint. "
        "A smaller lr (or a longer warmup-rounds) usually helps.", check)


def _round_row(state: ServerState, plan: StepPlan, check: ReplyCheck, stats: NoiseStats, taught: TeacherOutput,
               lr: float, timing: dict[str, float]) -> dict[str, Any]:
    """The round's row of rounds.csv (``state`` is the state after the round)."""
    valid = check.valid
    global_batch = sum(r.batch for r in valid)
    peaks = [r.metrics[proto.PEAK_MEM_MB] for r in valid if not math.isnan(r.metrics[proto.PEAK_MEM_MB])]
    return {
        "round": plan.round, "skipped": 0, "clients": len(valid), "planned_batch": plan.planned,
        "failed_clients": len(check.failures),
        "global_batch": global_batch, "samples_seen": state.samples_seen, "lr": lr,
        "train_loss": sum(r.batch * r.metrics[proto.TRAIN_LOSS] for r in valid) / global_batch,
        "grad_norm": stats.grad_norm, "tr_sigma": stats.tr_sigma, "grad_sq": stats.grad_sq, "b_simple": stats.b_simple,
        "virtual_s": timing["virtual_s"], "virtual_total_s": state.virtual_total,
        "client_compute_s_max": max(r.metrics[proto.COMPUTE_S] for r in valid),
        "client_peak_mem_mb_max": max(peaks) if peaks else math.nan,
        "round_trip_s": timing["round_trip_s"], "server_s": timing["server_s"], "teacher_time_s": timing["teacher_time_s"],
        **{f"teacher_{k}": v for k, v in ({"scale": 1.0, "noise_norm": 0.0} | taught.metrics).items()},
        **({"excluded_clients": len(state.persistence.excluded)} if plan.setup.cfg.exclude_ratio else {}),
    }


def _client_rows(plan: StepPlan, valid: list[ValidReply], virtual: list[float]) -> list[dict[str, Any]]:
    """The round's rows of clients.csv."""
    return [
        {"round": plan.round, "node_id": r.node_id, "partition_id": r.partition_id, "local_batch": r.batch,
         "micro_batch": int(r.metrics[proto.MICRO_BATCH]), "train_loss": r.metrics[proto.TRAIN_LOSS],
         "grad_norm": r.norm, "compute_s": r.metrics[proto.COMPUTE_S], "virtual_s": v,
         "budget_mb": r.metrics[proto.BUDGET_MB], "predicted_peak_mb": r.metrics[proto.PREDICTED_PEAK_MB],
         "peak_mem_mb": r.metrics[proto.PEAK_MEM_MB], "max_batch": int(r.metrics[proto.MAX_BATCH]),
         "startup_s": r.metrics.get(proto.STARTUP_S, math.nan), "setup_s": r.metrics.get(proto.SETUP_S, math.nan),
         "worker": f"{r.info.get('host', '')}:{r.info.get('pid', '')}", "ray_node": r.info.get(proto.RAY_NODE, ""),
         **({"pre_clip_norm": r.metrics[proto.PRE_CLIP_NORM]} if proto.PRE_CLIP_NORM in r.metrics else {})}
        for r, v in zip(valid, virtual)
    ]
