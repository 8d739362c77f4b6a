"""ClientApp: compute the gradient of this client's local batch and send it back.

Per round the server sends the global weights and this client's ``local-batch-size`` b_i,
``micro-batch-size``, ``local-steps`` H and ``lr``. The client draws b_i examples from an
epoch-wise shuffle of its partition (its position, ``drawn-examples``, comes from the server),
accumulates the mean-loss gradient over micro-batches, and replies with it (H = 1) or with the
pseudo-gradient (w_0 - w_H) / lr of H local SGD steps (H > 1), plus its BatchNorm buffers and
b_i, loss, compute seconds and peak memory (and |g_i|^2 in rounds with multipliers). With
``dp-clip-norm`` C > 0 the reply is clip(g_i) = g_i min(1, C / |g_i|), and ``pre-clip-norm`` |g_i|. A
teacher's round plan may add per-step learning rates, the server's momentum and velocity (the reply then carries the final
velocity) and a multiplier m_i for the gradient (``LocalOptimizer``).

Memory: the client's budget comes from its node config, its device profile or the run config
(workloads/devices.py ``memory_budget_mb``); the memory estimator of its exact step picks the
micro-batch that fits the budget less ``memory-margin``. The reply carries the predicted and
the measured peak of the step (estimators/step_peak.py).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from client_app.startup import STARTED_AT, where  # noqa: I001 - first: it records when the imports began

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.job import ClientJob, get_job, load_global, node_identity
from client_app.packing import answer_bundle
from client_app.secure import secure_mod
from client_app.run_config import client_run
from protocol.packing import bundle_threads
from estimators.performance import profile_batches
from estimators.step_peak import step_peak
from workloads.devices import memory_budget_mb
from workloads.config import ConfigError, RunConfig
from protocol import messages as m
from protocol.packing import PACKED_ACTION
from workloads.privacy import clip_gradient
from workloads.training import batch_gradient, local_momentum_sgd, pick_device, sq_norm, step_seconds

app = ClientApp()
PROCESS_THREADS = torch.get_num_threads()  # the CPUs this process was given (Ray sets OMP_NUM_THREADS in its actors)


def _client(context: Context) -> tuple[RunConfig, int, int, ClientJob, float, str]:
    """This node's run config, partition id and count, cached job, and memory budget (MiB) with its source."""
    run = client_run(context)  # parsed once per process and run (client_app/run_config.py)
    cfg = run.cfg
    pid, nparts, data_dir = node_identity(context.node_config, cfg)
    budget_mb, source = memory_budget_mb(context.node_config, run.profiles, cfg.memory_budget_mb, pid)
    return cfg, pid, nparts, get_job(cfg, pid, nparts, data_dir), budget_mb, source


@app.train(mods=[secure_mod])  # a SecAgg+ round's messages go through Flower's secaggplus_mod (client_app/secure.py)
def train(msg: Message, context: Context) -> Message:
    """Reply with this client's gradient for the round (see the module docstring)."""
    entered = time.time()
    cfg, pid, nparts, job, budget_mb, source = _client(context)
    ins = m.TrainInstruction.from_content(msg.content)
    n = len(job.partition)
    if ins.local_batch > n:
        raise ConfigError(
            f"run-config key 'global-batch-size' = {cfg.global_batch_size}: this client's local "
            f"batch b_i = {ins.local_batch} exceeds its partition ({n} examples, partition-id {pid} of {nparts})."
        )
    # the memory plan comes before any data is drawn: a bad budget fails first
    plan = job.memory_plan(ins.local_batch, ins.micro_batch, budget_mb, source)
    batches = job.draw(ins.drawn, ins.local_batch, ins.local_steps)
    model = job.model
    load_global(model, msg.content[m.ARRAYS])
    model.train()
    cpu_peak_mb = float("nan")
    if job.device.type == "cpu" and _check_memory(cfg, ins.server_round):
        cpu_peak_mb = _cpu_step_peak_mb(job, model, batches[0], plan.micro_batch, cfg.seed * 7 + ins.server_round)
    ready = time.time()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + ins.server_round * 1009 + pid)
    step = _step(job, model, batches, plan.micro_batch, ins, job.inputs_fn(gen))
    metrics = {
        m.NUM_EXAMPLES: ins.local_batch,
        m.TRAIN_LOSS: step.loss,
        m.COMPUTE_S: step.compute_s,
        m.PEAK_MEM_MB: step.peak_mb if step.peak_mb is not None else cpu_peak_mb,
        m.PREDICTED_PEAK_MB: plan.predicted_mb,
        m.BUDGET_MB: plan.budget_mb,
        m.MAX_BATCH: plan.max_batch,
        m.MICRO_BATCH: plan.micro_batch,
        m.PARTITION_ID: pid,
        m.PARTITION_SIZE: n,
        m.STARTUP_S: entered - STARTED_AT,  # process start -> handler (imports; large on a SuperNode)
        m.SETUP_S: ready - entered,  # data, model, memory plan, draw (disk-cached after the first) and memory check
    }
    if step.pre_clip_norm is not None:
        metrics[m.PRE_CLIP_NORM] = step.pre_clip_norm
    if step.grad_sq is not None:
        metrics[m.GRAD_SQ] = step.grad_sq  # |g_i|^2 before the multiplier (otherwise the server has g_i)
    names = [name for name, _ in model.named_parameters()]
    buffers = {k: v.detach().cpu() for k, v in model.named_buffers()}
    return Message(content=m.reply_content(names, step.grads, metrics, buffers, step.velocity, where()), reply_to=msg)


@dataclass
class _Step:
    grads: list[torch.Tensor]
    loss: float
    velocity: list[torch.Tensor] | None  # the final local velocity (a local optimizer only)
    grad_sq: float | None  # |g_i|^2 before the multiplier (rounds with multipliers only)
    compute_s: float
    peak_mb: float | None  # measured on a GPU; None on a CPU
    pre_clip_norm: float | None = None  # |g_i| before the DP clip (dp-clip-norm > 0 only)


def _step(job: ClientJob, model: torch.nn.Module, batches, micro: int, ins: m.TrainInstruction, inputs) -> _Step:
    """The timed step: the batch gradient, or H local steps of the plan's optimizer; then m_i."""
    local = ins.local
    with step_peak(job.device, ()) if job.device.type == "cuda" else contextlib.nullcontext() as peak:
        t0 = time.perf_counter()
        velocity = None
        if ins.local_steps == 1 and local.plain:
            loss = batch_gradient(model, job.loss_fn, inputs, *batches[0], micro)
            grads = [p.grad.detach() for p in model.parameters()]
        else:
            grads, loss, velocity = local_momentum_sgd(
                model, job.loss_fn, inputs, batches, ins.lr, micro, local.lrs, local.momentum,
                local.weight_decay, local.velocity_for(model))
            velocity = velocity if local.send_velocity else None  # teacher-velocity = from-weights
        pre_clip = None
        if job.cfg.dp_clip_norm > 0:  # client-level DP: the whole gradient (or pseudo-gradient) to L2 norm C
            grads, pre_clip = clip_gradient(grads, job.cfg.dp_clip_norm)
        grad_sq = sq_norm(grads) if local.scaled else None  # signed-noise: the server's statistics come from sums
        if local.grad_scale != 1.0:  # signed-noise: this client's multiplier m_i, so the server needs only the sum
            grads = [g * local.grad_scale for g in grads]
        if job.device.type == "cuda":
            torch.cuda.synchronize(job.device)
        compute_s = time.perf_counter() - t0
    return _Step(grads, loss, velocity, grad_sq, compute_s, peak.bytes / 2**20 if peak is not None else None, pre_clip)


def _check_memory(cfg: RunConfig, rnd: int) -> bool:
    """CPU: measure the step's peak this round? (first, last and every ``memory-check-every``-th; -1: never)."""
    every = cfg.memory_check_every
    return every >= 0 and (rnd == 1 or rnd == cfg.num_server_rounds or (every > 0 and rnd % every == 0))


def _cpu_step_peak_mb(job, model: torch.nn.Module, batch, micro: int, seed: int) -> float:
    """Peak MiB of this round's step, from a profiled replay before the timed step.

    The profiler slows small steps (up to 2.6x for a 0.5 ms MLP step), so the timed step runs
    without it. The replay recomputes the same gradient (the real step zeroes it first); the
    RNG state and the BatchNorm buffers are restored afterwards, so the round is unchanged.
    """
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    resident = [*model.parameters(), *(p.grad for p in model.parameters()), *model.buffers(), *batch]
    with torch.random.fork_rng(devices=[]), step_peak(job.device, resident) as peak:
        batch_gradient(model, job.loss_fn, job.inputs_fn(torch.Generator().manual_seed(seed)), *batch, micro)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return peak.bytes / 2**20


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (strategies/nodes.py); builds nothing."""
    pid, nparts, _ = node_identity(context.node_config, client_run(context).cfg)
    return Message(RecordDict({m.METRICS: MetricRecord({m.PARTITION_ID: pid, m.NUM_PARTITIONS: nparts})}),
                   reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Capacity probe for the adaptive batch policies (strategies/batch_policy.py).

    Replies with this client's memory limit (the estimator's largest single-pass batch under
    its budget less ``memory-margin``, at most its partition) and the median seconds of its
    real step at ``probe-count`` batch sizes, geometric from 1 to the limit. Times are of this
    process's device; the server applies the device profile.
    """
    cfg, pid, _, job, budget_mb, source = _client(context)
    limit = len(job.partition)
    if budget_mb > 0:
        limit = min(limit, job.memory_plan(1, 1, budget_mb, source).max_batch)
    sizes = profile_batches(limit, int(msg.content[m.CONFIG][m.PROBE_COUNT]))
    model = job.model
    model.train()
    inputs = job.inputs_fn(torch.Generator().manual_seed(cfg.seed))
    seconds = []
    start = time.perf_counter()
    for b in sizes:  # a warm-up and 3 timed steps per size: the probe is cheap on a slow device too
        x, y = job.splits.x_train.index_select(0, job.partition[:b]), job.splits.y_train.index_select(0, job.partition[:b])
        seconds.append(step_seconds(model, job.loss_fn, inputs, x, y, min_total_s=0.0, max_reps=3))
    return Message(content=RecordDict({m.METRICS: MetricRecord({
        m.PARTITION_ID: pid, m.MAX_BATCH: limit, m.PROBE_BATCHES: sizes, m.PROBE_SECONDS: seconds,
        m.PROBE_COMPUTE_S: time.perf_counter() - start,
    })}), reply_to=msg)


@app.train(PACKED_ACTION)
def train_packed(msg: Message, context: Context) -> Message:
    """A bundle of virtual clients' train messages (``virtual-clients``, client_app/packing.py).

    On a CPU, ``client-threads`` of them run at a time (0: as many as this process has CPUs),
    except in rounds that measure memory, whose clients run one by one.
    """
    cfg = client_run(context).cfg
    return _answer(msg, context, cfg, lambda content: _check_memory(cfg, m.round_of(content)))


@app.query(PACKED_ACTION)
def query_packed(msg: Message, context: Context) -> Message:
    """A bundle of virtual clients' queries (identify, capacity probe).

    One by one (a capacity probe times the client's step), with the intra-op threads a client
    of a train bundle gets in this process.
    """
    return _answer(msg, context, client_run(context).cfg, lambda content: True)


def _answer(msg: Message, context: Context, cfg: RunConfig, alone) -> Message:
    return answer_bundle(app, msg, context, bundle_threads(cfg, PROCESS_THREADS, pick_device(cfg.device)), alone=alone)
