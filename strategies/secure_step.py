"""``secure_step``: ``server_step`` for a round whose server sees only the secure sum.

What the server has after SecAgg+ (``SecureSum``): which sampled clients survived into the sum
(their plaintext ``num-examples`` and operational metrics: seconds, memory, micro-batch), which
dropped out at which stage, and the b-weighted mean of their vectors (protocol/secure.py): G,
S / B, the mean loss. From these only:

- the checks: every survivor's ``num-examples`` equals its b_i and its metrics are well formed;
  the mean has the model's shapes, is finite and passes its canary. A bad survivor cannot be
  dropped from a sum, so any failed check fails the round (``RoundFailure``). The per-client
  norm guard is gone; client-side clipping to ``secagg-clip-norm`` bounds each client instead;
- B' = sum of the survivors' b_i must reach ``min-batch-fraction`` of the plan; the step is then
  the exact mean over the survivors (up to the quantisation bound, strategies/secure.py);
- the noise statistics: ``noise_stats_from_sums(S, B', K', |G|^2, Q)``, with Q = sum m_i^2 b_i
  for signed-noise multipliers (the server chose the m_i);
- the teacher gets G only (``client_grads`` empty: strategies/secure.py allows only teachers
  that never read them), then the server optimizer, as in ``server_step``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol import messages as proto
from protocol.secure import SecureMean, read_secure_mean
from strategies.noise_scale import NoiseStats, noise_stats_from_sums
from strategies.server_state import ServerState
from strategies.tail_average import with_average
from strategies.server_step import (
    _client_rows, _finite_step, _require_enough, _round_row, _teach, round_progress,
)
from strategies.step_values import ReplyCheck, RoundFailure, StepPlan, StepRecord, ValidReply
from strategies.teachers import TeacherInput
from workloads.training import sq_norm

PUBLIC_METRICS = (proto.COMPUTE_S, proto.PEAK_MEM_MB, proto.PREDICTED_PEAK_MB, proto.BUDGET_MB, proto.MAX_BATCH,
                  proto.MICRO_BATCH)


@dataclass(frozen=True)
class SecureSum:
    """A secure round as the server saw it (strategies/secure_round.py builds it from Flower's workflow)."""

    survivors: Mapping[int, tuple[int, Mapping[str, Any]]]  # node id -> (num-examples, plaintext metrics)
    arrays: Sequence[Any] | None  # the unmasked mean vector (NumPy arrays); None: the protocol halted
    dropped: Mapping[int, str] = field(default_factory=dict)  # node id -> the stage it dropped out at
    error: str = ""  # why the protocol halted (names the threshold)


def secure_check(result: SecureSum, plan: StepPlan) -> tuple[ReplyCheck, str]:
    """The survivors as ``ValidReply`` values (no gradients: they are in the sum), failure rows, and
    the reason the whole round fails ('' if none)."""
    failures, valid, reasons = [], [], []
    for node, stage in sorted(result.dropped.items()):
        pid, b = plan.assigned.get(node, (-1, 0))
        failures.append({"round": plan.round, "node_id": node, "partition_id": pid, "local_batch": b,
                         "reason": f"dropped out of the secure round at stage '{stage}'"})
    for node, (count, metrics) in sorted(result.survivors.items()):
        pid, b = plan.assigned.get(node, (-1, 0))
        numbers = {k: metrics.get(k) for k in PUBLIC_METRICS}
        bad = [k for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
        if node not in plan.assigned or count != b or bad:
            why = ("was not sampled" if node not in plan.assigned else f"num-examples = {count}; the server "
                   f"assigned {b}" if count != b else f"metrics missing or not numbers: {', '.join(bad)}")
            reasons.append(f"node {node} (partition {pid}) {why}")
            continue
        valid.append(ValidReply(node, pid, b, [], None, {k: float(v) for k, v in numbers.items()}, math.nan, {}))
    valid.sort(key=lambda r: r.partition_id)
    check = ReplyCheck(valid, sorted(failures, key=lambda f: (f["partition_id"], f["node_id"])), sorted(result.dropped))
    return check, "; ".join(reasons)


def secure_step(state: ServerState, result: SecureSum, plan: StepPlan, *,
                received_at: float | None = None) -> tuple[ServerState, StepRecord]:
    """``server_step`` from the secure sum (module docstring); raises ``RoundFailure`` or ``DivergenceError``."""
    received_at = time.perf_counter() if received_at is None else received_at
    setup = plan.setup
    check, refused = secure_check(result, plan)
    mean = _read(result, plan, check, refused)
    _require_enough(check, plan)
    t0 = time.perf_counter()
    valid, batches = check.valid, [r.batch for r in check.valid]
    total = float(sum(batches))
    for r in valid:  # the round's mean loss for rounds.csv (per-client losses stay in the sum)
        r.metrics[proto.TRAIN_LOSS] = mean.loss
    stats = secure_stats(plan, mean, valid)
    params = [state.model[name] for name in setup.param_names]
    taught, teacher_state, teacher_s = _teach(state, plan, TeacherInput(
        mean.grads, [], batches, plan.round, lr=plan.lr, params=params, weight_decay=setup.cfg.weight_decay,
        stats=stats))
    lr = plan.lr * taught.lr_scale
    params, velocity = _finite_step(state, plan, params, taught.grad, lr, check)
    model = OrderedDict(state.model)
    model.update(zip(setup.param_names, params))
    server_s = time.perf_counter() - t0
    drawn, virtual, virtual_s = round_progress(state, plan, valid, server_s)
    state = dataclasses.replace(
        state, model=model, velocity=velocity, teacher=teacher_state, drawn=drawn, round=plan.round, failed_rounds=0,
        samples_seen=state.samples_seen + int(total) * plan.local_steps, virtual_total=state.virtual_total + virtual_s,
        policy=state.policy.observe(setup.cfg, plan.round, stats, server_s))
    state = with_average(state, setup.cfg)
    timing = {"virtual_s": virtual_s, "round_trip_s": received_at - plan.sent_at, "server_s": server_s,
              "teacher_time_s": teacher_s}
    row = _round_row(state, plan, check, stats, taught, lr, timing) | {"secure": 1, "clipped_share": mean.clipped}
    clients = [c | {"train_loss": math.nan, "grad_norm": math.nan} for c in _client_rows(plan, valid, virtual)]
    return state, StepRecord(row, clients, check)


def _read(result: SecureSum, plan: StepPlan, check: ReplyCheck, refused: str) -> SecureMean:
    """The mean read from the sum; ``RoundFailure`` when the protocol halted or a check failed."""
    if result.arrays is None:
        raise RoundFailure(f"round {plan.round}: {result.error}", check)
    if refused:
        raise RoundFailure(f"round {plan.round}: the secure sum contains invalid clients, and a sum cannot drop "
                           f"them: {refused}", check)
    shapes = [plan.setup.param_shapes[n] for n in plan.setup.param_names]
    mean = read_secure_mean(result.arrays, shapes, plan.setup.cfg.secagg_clip_norm)
    if isinstance(mean, str):
        raise RoundFailure(f"round {plan.round}: {mean}", check)
    return mean


def secure_stats(plan: StepPlan, mean: SecureMean, valid: Sequence[ValidReply]) -> NoiseStats:
    """``noise_stats_from_sums`` from S = B S/B, the survivors' B and K, |G|^2 and (signed-noise) Q."""
    total = float(sum(r.batch for r in valid))
    scales = plan.teacher_plan.grad_scale
    q = None if scales is None else sum(scales[r.partition_id] ** 2 * r.batch for r in valid)
    return noise_stats_from_sums(mean.mean_sq * total, total, len(valid), sq_norm(mean.grads), q)
