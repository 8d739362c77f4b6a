"""Byzantine attacks for tests and benchmarks: what the f colluding Byzantine clients send.

Never imported by product code. The gradient attacks take the honest clients' gradients of the
round as one float32 matrix ``honest`` (H x D, a row per honest client, ``strategies.robust.flatten``
of its tensors), or the attacker's own honest gradient ``g`` (D), and return the D-vector the
attacker sends. Colluding attackers see every honest gradient (the omniscient setting of
Karimireddy, He and Jaggi, ICML 2021, "Learning from History for Byzantine Robust Optimization").

- ``alie`` (Baruch, Baruch and Goldberg, NeurIPS 2019, "A Little Is Enough"): every attacker
  sends ``mean - z * std`` per coordinate, with ``z = Phi^-1((n - s) / n)``,
  ``s = floor(n / 2 + 1) - f``: small enough per coordinate to hide among the honest values.
- ``ipm`` (Xie, Koyejo and Gupta, UAI 2020, "Fall of Empires: inner product manipulation"):
  ``-epsilon * mean``; epsilon 0.1 as in Karimireddy et al. 2021.
- ``sign_flip``: ``-g``, the attacker's own gradient with every sign bit flipped
  (Karimireddy et al.'s "bit flipping").
- ``label_flip``: the gradient of the attacker's own batch with labels ``y -> C - 1 - y``.
- ``bit_flip``: faulty memory, not malice: one random bit (of 32) flipped in a random
  ``fraction`` (1%) of the float32 entries of the attacker's own gradient; an exponent bit
  makes an entry huge, or Inf/NaN.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from workloads.training import InputFn, batch_gradient

# the benchmark's threat model (experiments.bench_byzantine): attack -> f Byzantine of N_CLIENTS
N_CLIENTS = 20
ATTACKS = {"clean": 0, "alie": 4, "ipm": 8, "sign-flip": 4, "label-flip": 4, "bit-flip": 4}  # attack -> f
ABSENT = {"absent-4": 4, "absent-8": 8}  # the oracle: the f Byzantine partitions removed (bench_byzantine's docstring)
# the paper's attacks, in the space the aggregator sees (momentum_space below); only when named
PAPER = {"alie-paper": 4, "ipm-paper": 8, "sign-flip-paper": 4, "label-flip-paper": 4}
CONDITIONS = {**ATTACKS, **ABSENT, **PAPER}


def alie_z(n: int, f: int) -> float:
    """ALIE's z_max = Phi^-1((n - s) / n) with s = floor(n / 2 + 1) - f (Baruch et al. 2019, eq. 3).

    ``n`` clients in all, ``f`` of them Byzantine; e.g. n = 20, f = 4: s = 7, Phi^-1(0.65) = 0.385.
    """
    if not 0 < f < n:
        raise ValueError(f"need 0 < f < n, got n = {n}, f = {f}")
    s = math.floor(n / 2 + 1) - f
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((n - s) / n, dtype=torch.float64)))


def alie(honest: torch.Tensor, n: int, f: int) -> torch.Tensor:
    """A Little Is Enough: ``mean - z * std`` per coordinate of ``honest`` (H x D), z = ``alie_z(n, f)``.

    ``std`` is the sample standard deviation over the H honest rows (as in the paper's code).
    """
    x = honest.to(torch.float64)
    return (x.mean(dim=0) - alie_z(n, f) * x.std(dim=0)).to(torch.float32)


def ipm(honest: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Inner product manipulation: ``-epsilon * mean`` of ``honest`` (H x D) (Xie et al. 2020)."""
    return (-epsilon * honest.to(torch.float64).mean(dim=0)).to(torch.float32)


def sign_flip(g: torch.Tensor) -> torch.Tensor:
    """The attacker's own gradient with every sign flipped: ``-g``."""
    return -g


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels ``y -> C - 1 - y`` (C = ``num_classes``)."""
    return num_classes - 1 - y


def label_flip(model: nn.Module, loss_fn: nn.Module, inputs: InputFn, x: torch.Tensor, y: torch.Tensor,
               num_classes: int) -> list[torch.Tensor]:
    """The mean-loss gradient of ``model`` on the batch ``(x, C - 1 - y)``, one tensor per parameter.

    ``loss_fn`` sums over examples (``Workload.loss``); ``inputs`` turns uint8 ``x`` into model input.
    """
    batch_gradient(model, loss_fn, inputs, x, flip_labels(y, num_classes))
    return [p.grad.detach().clone() for p in model.parameters()]


def bit_flip(g: torch.Tensor, generator: torch.Generator, fraction: float = 0.01) -> torch.Tensor:
    """A copy of float32 ``g`` with one random bit flipped in ``max(1, round(fraction * numel))`` random entries.

    Entries are drawn without replacement, the bit of each uniformly among its 32 (XOR of the
    entry's int32 view with ``1 << bit``).
    """
    if g.dtype != torch.float32:
        raise ValueError(f"bit_flip needs float32, got {g.dtype}")
    flat = g.detach().reshape(-1).clone()
    count = min(flat.numel(), max(1, round(fraction * flat.numel())))
    where = torch.randperm(flat.numel(), generator=generator)[:count]
    bits = torch.randint(0, 32, (count,), generator=generator)
    masks = torch.bitwise_left_shift(torch.ones(count, dtype=torch.int64), bits)
    masks = torch.where(masks >= 2 ** 31, masks - 2 ** 32, masks).to(torch.int32)  # bit 31 is int32's sign bit
    words = flat.view(torch.int32)
    words[where] = torch.bitwise_xor(words[where], masks)
    return flat.reshape(g.shape)


def momentum_space(sent: dict[int, torch.Tensor], byzantine: list[int], kind: str, tracked: dict[int, torch.Tensor],
                   beta: float, decay: torch.Tensor, n: int) -> dict[int, torch.Tensor]:
    """The paper's attacks: the f attackers pick the momentum the aggregator sees, not the gradient they send.

    In Karimireddy et al.'s released code the workers keep m_i = beta * m_i + g_i and send it;
    ALIE and IPM are computed from the honest workers' momenta, and the Byzantine workers keep
    no momentum (bit flipping sends ``-g``, label flipping its raw gradient). Here the server keeps
    m_i = beta * m_i + g_i + decay (``strategies.robust.worker_momenta``, ``decay`` = weight
    decay x the weights; for ``mean`` their average is the server's momentum), so an attacker
    that wants momentum u sends g = u - beta * m_prev - decay. ``sent`` holds this round's
    vectors (honest gradients; for ``sign-flip`` and ``label-flip`` the attackers' raw vectors);
    ``tracked`` the momenta (updated in place: omniscient attackers see every honest g_i).
    ``kind``: ``alie`` (u = mean - z std of the honest momenta), ``ipm`` (-0.1 x their mean),
    ``sign-flip``, ``label-flip`` (u = the raw vector). Returns the vectors to send.
    """
    bad = set(byzantine)
    previous = {p: tracked.get(p, torch.zeros_like(v)) for p, v in sent.items()}
    momenta = {p: beta * previous[p] + v + decay for p, v in sent.items() if p not in bad}
    honest = torch.stack([momenta[p] for p in sorted(momenta)])
    if kind == "alie":
        target = alie(honest, n, len(bad))
    elif kind == "ipm":
        target = ipm(honest, 0.1)
    elif kind not in ("sign-flip", "label-flip"):
        raise ValueError(f"momentum_space: kind {kind!r} is not one of alie, ipm, sign-flip, label-flip")
    out = dict(sent)
    for p in sorted(bad & set(sent)):
        momenta[p] = target if kind in ("alie", "ipm") else sent[p]
        out[p] = momenta[p] - beta * previous[p] - decay
    tracked.update(momenta)
    return out
