"""A round behind secure aggregation: Flower's SecAgg+ workflow driven from our Message-API strategy.

Flower 1.42's ``SecAggPlusWorkflow`` is written for the legacy API: it reads the round and the
sampled clients from a ``LegacyContext`` (a legacy strategy's ``configure_fit``) and hands the
unmasked weighted mean to its ``aggregate_fit``. ``secure_round`` runs its four stages itself
(setup, share keys, collect masked vectors, unmask; each one ``send_and_receive`` of message
type ``train``) with a ``_LegacyAdapter`` as that strategy: ``configure_fit`` names the round's
sampled nodes, and after the setup stage each node's stage-2 content is replaced by our own
train instruction (the mod hands it to our unchanged train handler); ``aggregate_fit`` keeps
the results. Nothing of the protocol is re-implemented here.

``SecureLargeBatchStrategy`` is ``LargeBatchStrategy`` with two hooks changed:
``configure_train`` keeps the round's messages and sends none through Flower's loop, and
``_step`` runs ``secure_round`` on them and ``secure_step`` (strategies/secure_step.py) on its
result. A short round is skipped, never retried (a retry would be a new protocol run).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from protocol.secure import SERVER_WORKFLOW, use_strong_masks
from strategies.large_batch import LargeBatchStrategy
from strategies.nodes import STARTUP_WAIT_S
from strategies.secure import SecAggParams, secagg_params
from strategies.secure_step import SecureSum, secure_step
from strategies.step_values import ClientReply, RoundFailure, StepError, StepRecord
from strategies.server_state import ServerState

use_strong_masks(SERVER_WORKFLOW)  # the masks from the whole 256-bit seed (protocol/secure.py)

STAGES = ("setup", "share keys", "collect masked vectors", "unmask")


@dataclass
class _Proxy:
    """What the workflow reads of a legacy ClientProxy: the node id."""

    node_id: int


class _LegacyAdapter:
    """The legacy strategy the workflow calls: it samples the round's nodes and keeps the results."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes, self.results = nodes, None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102 - legacy Strategy API
        return [(_Proxy(n), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102 - legacy Strategy API
        self.results = results  # each FitRes's parameters are the unmasked weighted mean
        return None, {}


class _IsolatedGrid:
    """Sends each message with its own copy of its config records (the workflow sends one content to
    every node, and the client mod pops from it: harmless over a network, not in flb/inprocess.py)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for msg in messages:
            content = RecordDict({k: ConfigRecord(dict(v)) if isinstance(v, ConfigRecord) else v
                                  for k, v in msg.content.items()})
            md = msg.metadata
            out.append(Message(content, dst_node_id=md.dst_node_id, message_type=md.message_type, group_id=md.group_id))
        return list(self._grid.send_and_receive(out, timeout=timeout))


def secure_round(grid: Grid, contents: dict[int, RecordDict], rnd: int, params: SecAggParams,
                 timeout: float | None) -> SecureSum:
    """Run SecAgg+ over the nodes of ``contents`` (node id -> its train instruction); the round's ``SecureSum``."""
    workflow = SecAggPlusWorkflow(
        params.num_shares, params.threshold, max_weight=params.max_weight, clipping_range=params.clipping_range,
        quantization_range=params.quantization_range, modulus_range=params.modulus_range, timeout=timeout)
    adapter = _LegacyAdapter(sorted(contents))
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict({
        MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: rnd}), MAIN_PARAMS_RECORD: ArrayRecord()}), run_config={})
    context, state = LegacyContext(base, strategy=adapter), WorkflowState()
    stages = (workflow.setup_stage, workflow.share_keys_stage, workflow.collect_masked_vectors_stage,
              workflow.unmask_stage)
    isolated, dropped, active = _IsolatedGrid(grid), {}, set(contents)
    for name, stage in zip(STAGES, stages):
        ok = stage(isolated, context, state)
        for node in active - state.active_node_ids:
            dropped[node] = name
        active = set(state.active_node_ids)
        if name == "setup":
            state.nid_to_fitins = {n: contents[n] for n in state.nid_to_fitins}  # our instruction, for stage 2
        if not ok:
            break
    survivors = {proxy.node_id: (fit.num_examples, dict(fit.metrics)) for proxy, fit in state.legacy_results}
    if adapter.results is None:
        return SecureSum(survivors, None, dropped, _halted(name, len(contents), len(active), params.threshold))
    return SecureSum(survivors, parameters_to_ndarrays(adapter.results[0][1].parameters), dropped)


def _halted(stage: str, k: int, alive: int, threshold: int) -> str:
    return (f"secure aggregation halted at stage '{stage}': {alive} of {k} sampled clients left, fewer than "
            f"secagg-threshold t = {threshold} (SecAgg+ needs t live clients to remove the masks)")


class SecureLargeBatchStrategy(LargeBatchStrategy):
    """``LargeBatchStrategy`` whose rounds run behind SecAgg+ (module docstring)."""

    _contents: dict[int, RecordDict]  # this round's train instructions, by node (set by configure_train)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Plan the round as usual; keep its messages for ``secure_round`` and send none through Flower's loop."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._contents = {msg.metadata.dst_node_id: msg.content for msg in messages}
        return []

    def _step(self, received: list[ClientReply]) -> tuple[ServerState, StepRecord]:
        """Run SecAgg+ on the kept messages and ``secure_step`` on its sum; a short round is skipped."""
        plan, cfg = self.plan, self.cfg
        first = plan.round == self._start_round + 1
        timeout = max(cfg.round_timeout_s, STARTUP_WAIT_S) if first else cfg.round_timeout_s
        params = secagg_params(cfg, [b for _, b in plan.assigned.values()])
        k = len(plan.assigned)
        if k >= 3 and 2 <= params.threshold < k:
            result = secure_round(self._grid, self._contents, plan.round, params, timeout)
        else:  # the round shrank to the nodes usable now (strategies/large_batch.py)
            result = SecureSum({}, None, {}, f"only {k} usable clients: SecAgg+ needs at least 3 and more than "
                                             f"secagg-threshold t = {params.threshold}")
        try:
            state, record = secure_step(self.server_state, result, plan, received_at=time.perf_counter())
        except RoundFailure as err:
            return self._skip(err)
        except StepError as err:
            if err.check is not None:
                self._report(err.check)
            raise
        self._report(record.check)
        if record.row["clipped_share"] > 0:
            log(WARNING, "round %d: clients holding %.0f%% of the batch clipped their gradient to secagg-clip-norm = %g: "
                "the step is not the exact mean", plan.round, 100 * record.row["clipped_share"], cfg.secagg_clip_norm)
        return state, record
