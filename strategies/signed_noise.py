"""``signed-noise``: small-batch gradient noise that survives secure aggregation.

With secure aggregation the server learns only the sum of the clients' replies, never one
client's gradient, so the ``noise`` teacher (which rebuilds noise from the spread g_i - G) is
impossible. Instead the server assigns every client a multiplier m_i = 1 + beta t_i before the
round; client i replies with m_i g_i, and the server's usual b_i-weighted mean of the replies is

    G~ = sum_i m_i b_i g_i / B = G + (beta / B) sum_i t_i b_i g_i.

**Derivation.** Let the g_i be independent, E g_i = mu, Cov g_i = Sigma / b_i (b_i IID examples
with per-example covariance Sigma), and let the t_i be fixed numbers with

    (1) sum_i t_i b_i = 0        and        (2) sum_i t_i^2 b_i = B.

Then E G~ = mu (1 + beta sum_i t_i b_i / B) = mu by (1): the noise is unbiased. And

    Cov G~ = sum_i m_i^2 b_i^2 (Sigma / b_i) / B^2 = (Sigma / B^2) sum_i (1 + beta t_i)^2 b_i
           = (Sigma / B^2) (B + 2 beta sum_i t_i b_i + beta^2 sum_i t_i^2 b_i) = (1 + beta^2) Sigma / B

by (1) and (2). A gradient of b_s examples has covariance Sigma / b_s, so

    beta = sqrt(B / b_s - 1)

gives G~ exactly the mean and covariance of a b_s-example gradient (the target of the ``noise``
teacher and of Wen et al. 2020), for any t satisfying (1) and (2).

**The signs.** The server splits the round's clients at random into halves P and N (sizes
floor(K/2) and ceil(K/2), which half gets the extra one drawn at random) and sets
t_i = +sqrt(B_N / B_P) on P and t_i = -sqrt(B_P / B_N) on N, where B_P, B_N are the halves'
examples: (1) and (2) then hold exactly for any b_i, and with equal halves t_i = +-1. Because a
split and its mirror are equally likely, E t_i = 0 for every client, so even under non-IID data
(E g_i = mu_i) the noise has mean zero over the draws.

No client learns another's multiplier or gradient, and the server needs only the sum, plus, for
the noise statistics, the sum of the clients' b_i |g_i|^2 (strategies/noise_scale.py,
``noise_stats_from_sums``). A client that drops out breaks (1) for that round, so the teacher
requires ``min-batch-fraction = 1`` (a round then fails rather than apply biased noise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from strategies.round_plan import RoundPlan
from strategies.teachers import SeededTeacher, TeacherInput, TeacherOutput


def noise_beta(total: int, small_batch: int) -> float:
    """beta = sqrt(B / b_s - 1): the multiplier spread that gives a b_s-example covariance (0 when B <= b_s)."""
    return math.sqrt(max(0.0, total / small_batch - 1.0))


def balanced_signs(batches: Mapping[int, int], generator: torch.Generator) -> dict[int, float]:
    """t_i per partition id with sum_i t_i b_i = 0 and sum_i t_i^2 b_i = B (module docstring).

    Needs at least two clients.
    """
    pids = sorted(batches)
    k = len(pids)
    if k < 2:
        raise ValueError("balanced signs need at least two clients")
    order = torch.randperm(k, generator=generator).tolist()
    n_plus = k // 2 + (int(torch.randint(0, 2, (1,), generator=generator)) if k % 2 else 0)
    plus = {pids[i] for i in order[:n_plus]}
    b_plus = sum(batches[p] for p in plus)
    b_minus = sum(batches.values()) - b_plus
    up, down = math.sqrt(b_minus / b_plus), -math.sqrt(b_plus / b_minus)
    return {p: (up if p in plus else down) for p in pids}


class SignedNoiseTeacher(SeededTeacher):
    """``teacher = "signed-noise"``: per-client multipliers m_i = 1 + beta t_i (module docstring)."""

    name = "signed-noise"

    def __init__(self, small_batch: int, seed: int) -> None:
        super().__init__(seed + 9_973)  # the signs' generator
        self.small_batch = small_batch
        self.beta = 0.0  # this round's, set by ``plan``

    def state_dict(self) -> dict:
        """The sign generator's state and this round's beta (a checkpoint restores the same future multipliers)."""
        return {**super().state_dict(), "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (a checkpoint without beta: 0 until the next ``plan``)."""
        super().load_state_dict(state)
        self.beta = float(state.get("beta", 0.0))

    def multipliers(self, batches: Mapping[int, int]) -> dict[int, float]:
        """m_i = 1 + beta t_i per partition id (all 1 with one client or B <= b_s)."""
        self.beta = noise_beta(sum(batches.values()), self.small_batch)
        if len(batches) < 2 or self.beta == 0.0:
            return {p: 1.0 for p in batches}
        return {p: 1.0 + self.beta * t for p, t in balanced_signs(batches, self.generator).items()}

    def plan(self, server_round: int, batches: Mapping[int, int]) -> RoundPlan:
        """Send every client its multiplier."""
        return RoundPlan(grad_scale=self.multipliers(batches))

    def __call__(self, inp: TeacherInput) -> TeacherOutput:
        """Return the aggregate as it is: the noise is already in it.

        ``noise_norm`` is the noise's expected norm, beta sqrt(tr_sigma / B) from the round's
        statistics (the server cannot see the noise itself, only the sum).
        """
        tr = inp.stats.tr_sigma if inp.stats is not None else math.nan
        expected = self.beta * math.sqrt(tr / sum(inp.client_batches)) if tr == tr and tr > 0 else math.nan
        return TeacherOutput(inp.grad, metrics={"scale": 1.0, "beta": self.beta, "noise_norm": expected})
