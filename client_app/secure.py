"""The client's side of a secure round: Flower's ``secaggplus_mod`` around the train handler.

``secure_mod`` passes a train message without SecAgg+ configs straight to the handler (a
plain round). A SecAgg+ message goes through ``secaggplus_mod``: stages 0, 1 and 3 (keys,
shares, unmasking) never reach the handler; stage 2 does, with the round's usual instruction,
and ``as_fit_result`` turns the handler's reply into what the mod masks: a legacy FitRes whose
parameters are the vector x_i of protocol/secure.py, num_examples = b_i (the mod's weight),
and metrics that hold only the step's operational figures (seconds, memory, micro-batch,
partition). The loss and the gradient norm travel inside the masked vector only.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client_app.run_config import client_run
from protocol import messages as m
from protocol.arrays import record_tensors
from protocol.secure import CLIENT_MOD, secure_vector, use_strong_masks

use_strong_masks(CLIENT_MOD)  # the masks from the whole 256-bit seed (protocol/secure.py)

PRIVATE_METRICS = (m.TRAIN_LOSS, m.GRAD_SQ)  # data-dependent: inside the masked vector, never in the clear


def secure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ messages through Flower's ``secaggplus_mod``; others to the handler unchanged."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def handler(inner: Message, ctx: Context) -> Message:
        reply = call_next(inner, ctx)
        if reply.has_error():
            return reply
        return Message(as_fit_result(reply, client_run(ctx).cfg.secagg_clip_norm), reply_to=inner)

    return secaggplus_mod(msg, context, handler)


def as_fit_result(reply: Message, clip_norm: float):
    """The handler's train reply as the legacy FitRes record the mod expects (module docstring)."""
    content = reply.content
    if m.BUFFERS in content.array_records or m.VELOCITY in content.array_records:
        raise ValueError("secure aggregation sums gradients only: this round's reply also has buffers or a velocity")
    metrics = dict(content[m.METRICS])
    grads = list(record_tensors(content[m.GRADS]).values())
    vector = secure_vector(grads, float(metrics[m.TRAIN_LOSS]), clip_norm, metrics.get(m.GRAD_SQ))
    public = {k: v for k, v in metrics.items() if k not in PRIVATE_METRICS}
    fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), int(metrics[m.NUM_EXAMPLES]), public)
    return compat.fitres_to_recorddict(fit, keep_input=True)
