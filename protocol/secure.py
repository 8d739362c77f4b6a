"""What a client puts into a secure sum, how the server reads the mean back, and the masks' generator.

With ``secure-aggregation`` a round runs Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server,
``secaggplus_mod`` on the client; strategies/secure_round.py and client_app/secure.py). The
protocol sums, per coordinate, the vectors b_i x_i of the surviving clients modulo 2^32 and
hands the server only sum_i b_i x_i / sum_i b_i. Client i's vector x_i is (``secure_vector``)

    x_i = [ c_i g_i ,  |c_i g_i|^2 / C ,  min(loss_i, L) C / L ,  C / 2 ,  C [c_i < 1] ]

with C = ``secagg-clip-norm``, c_i = min(1, C / |g_i|) (client-side clipping: every entry
then lies in [-C, C], Flower's clipping range, so the quantiser never clips), and L =
``LOSS_MAX``. The server reads (``read_secure_mean``) the mean gradient G, S / B with
S = sum_i b_i |g_i|^2 (for ``noise_stats_from_sums``), the mean loss, the share of the
examples whose client clipped, and a canary that must read C / 2: a sum unmasked with the wrong masks (a client or server whose mask generator
differs) fails it instead of moving the model.

**Masks.** Flower 1.42's ``pseudo_rand_gen`` folds each 32-byte seed into 32 bits
(XOR of its 4-byte words) and seeds NumPy's ``RandomState`` with them: every mask is one of
2^32 vectors, a brute-force search away. ``shake_mask`` expands the whole seed with SHAKE-256
(FIPS 202, hashlib) instead; ``use_strong_masks`` installs it in the Flower module that calls
the generator, on each side. Both sides must install it (the canary checks that they did).
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

LOSS_MAX = 100.0  # L: the loss enters the sum clipped to [0, L] (it is only logged)
EXTRAS = 4  # |c g|^2 / C, the scaled loss, the canary, the clip indicator
CANARY_TOL = 1e-3  # relative: far above the quantisation error, far below a wrongly unmasked sum's
MASK_DOMAIN = b"flower-large-batch/secagg-mask/v1"
CLIENT_MOD = "flwr.client.mod.secure_aggregation.secaggplus_mod"
SERVER_WORKFLOW = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"


def secure_vector(grads: Sequence[torch.Tensor], loss: float, clip_norm: float,
                  grad_sq: float | None = None) -> list[np.ndarray]:
    """Client i's vector x_i (module docstring) as float64 arrays.

    ``grad_sq``: |g_i|^2 when ``grads`` carry a multiplier m_i (signed-noise: the sum needs the
    unscaled norm); it enters clipped to C^2.
    """
    norm = math.sqrt(sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in grads))
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    arrays = [g.detach().to(torch.float64).cpu().numpy() * factor for g in grads]
    sq = (norm * factor) ** 2 if grad_sq is None else min(float(grad_sq), clip_norm**2)
    loss_part = min(max(float(loss), 0.0), LOSS_MAX) * clip_norm / LOSS_MAX
    return [*arrays, np.array([sq / clip_norm, loss_part, clip_norm / 2, clip_norm * float(factor < 1.0)])]


@dataclass(frozen=True)
class SecureMean:
    """The b-weighted mean of the surviving clients' vectors, read back."""

    grads: list[torch.Tensor]  # G = sum_i b_i c_i g_i / B, per parameter tensor (float32)
    mean_sq: float  # S / B = sum_i b_i |c_i g_i|^2 / B, squared gradient norm
    loss: float  # sum_i b_i loss_i / B (losses clipped to LOSS_MAX)
    clipped: float  # sum_i b_i [c_i < 1] / B: the share of the examples whose client clipped its gradient


def read_secure_mean(arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]],
                     clip_norm: float) -> SecureMean | str:
    """The mean of the vectors, or why the sum cannot be used (shape, finiteness, canary)."""
    if len(arrays) != len(shapes) + 1:
        return f"the secure sum has {len(arrays)} arrays; expected {len(shapes) + 1}"
    for i, (a, shape) in enumerate(zip(arrays, shapes)):
        if tuple(a.shape) != tuple(shape):
            return f"the secure sum's array {i} has shape {tuple(a.shape)}; expected {tuple(shape)}"
    extras = np.asarray(arrays[-1], dtype=np.float64)
    if extras.shape != (EXTRAS,):
        return f"the secure sum's extras have shape {extras.shape}; expected ({EXTRAS},)"
    if not all(np.isfinite(a).all() for a in arrays):
        return "the secure sum is not finite"
    canary = extras[2] / (clip_norm / 2)
    if abs(canary - 1.0) > CANARY_TOL:
        return (f"the secure sum failed its check (canary {canary:.6g}, expected 1): the masks did not cancel; "
                "do the server and every client use the same mask generator (protocol/secure.py use_strong_masks)?")
    grads = [torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for a in arrays[:-1]]
    return SecureMean(grads, float(extras[0]) * clip_norm, float(extras[1]) * LOSS_MAX / clip_norm,
                      float(extras[3]) / clip_norm)


def shake_mask(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Mask arrays uniform in [0, num_range) expanded from all of ``seed`` by SHAKE-256.

    A drop-in for Flower's ``pseudo_rand_gen`` (same arguments and output types, int64 arrays);
    ``num_range`` must be a power of two up to 2^32 (SecAgg+'s modulus).
    """
    if num_range <= 0 or num_range & (num_range - 1) or num_range > 2**32:
        raise ValueError(f"num_range = {num_range}: a power of two up to 2**32 is needed")
    sizes = [math.prod(d) for d in dimensions_list]
    stream = hashlib.shake_256(MASK_DOMAIN + seed).digest(4 * sum(sizes))
    words = np.frombuffer(stream, dtype="<u4").astype(np.int64) & (num_range - 1)
    out, start = [], 0
    for dims, n in zip(dimensions_list, sizes):
        out.append(words[start:start + n].reshape(dims).copy())
        start += n
    return out


def use_strong_masks(module_name: str) -> None:
    """Make Flower's module ``module_name`` (``CLIENT_MOD`` or ``SERVER_WORKFLOW``) draw masks with ``shake_mask``."""
    module = importlib.import_module(module_name)
    if not hasattr(module, "pseudo_rand_gen"):
        raise RuntimeError(f"{module_name} has no pseudo_rand_gen: Flower changed; review protocol/secure.py")
    module.pseudo_rand_gen = shake_mask
