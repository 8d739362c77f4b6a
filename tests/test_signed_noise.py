"""signed-noise and noise statistics from sums, on synthetic problems with known gradient covariance.

As tests/test_teachers.py does for ``noise``: client gradients g_i ~ N(mu, Sigma / b_i) exactly,
then what the secure-aggregation server computes from the replies m_i g_i alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from strategies.aggregation import weighted_mean
from strategies.noise_scale import noise_stats, noise_stats_from_sums, sq_norm
from strategies.signed_noise import SignedNoiseTeacher, balanced_signs, noise_beta
from strategies.teachers import TeacherInput
from tests.test_teachers import BATCHES, DIM, _client_grads, _problem

UNEVEN = {3: 16, 5: 16, 0: 32, 7: 8, 1: 24, 2: 16, 4: 8, 6: 8}  # partition -> b_i, B = 128


def test_balanced_signs_satisfy_both_constraints_exactly_and_are_symmetric():
    gen = torch.Generator().manual_seed(0)
    total = sum(UNEVEN.values())
    mean_t = dict.fromkeys(UNEVEN, 0.0)
    for _ in range(2000):
        t = balanced_signs(UNEVEN, gen)
        assert sum(t[p] * b for p, b in UNEVEN.items()) == pytest.approx(0.0, abs=1e-9)
        assert sum(t[p] ** 2 * b for p, b in UNEVEN.items()) == pytest.approx(total, rel=1e-12)
        for p in t:
            mean_t[p] += t[p] / 2000
    assert max(abs(v) for v in mean_t.values()) < 0.1  # E t_i = 0: a split and its mirror are equally likely
    odd = {0: 10, 1: 10, 2: 10}  # K odd: halves of 1 and 2, either way round
    t = balanced_signs(odd, gen)
    assert sorted(round(abs(v), 6) for v in t.values()) == sorted([round(math.sqrt(2), 6)] + [round(math.sqrt(0.5), 6)] * 2)


def test_beta_gives_the_small_batch_covariance_for_any_draw():
    """sum_i m_i^2 b_i = B^2 / b_s exactly: Cov(G~ | t) = Sigma / b_s, whatever the signs."""
    teacher = SignedNoiseTeacher(small_batch=8, seed=1)
    total = sum(UNEVEN.values())
    assert noise_beta(total, 8) == pytest.approx(math.sqrt(15))
    for _ in range(20):
        m = teacher.multipliers(UNEVEN)
        assert sum(m[p] * b for p, b in UNEVEN.items()) == pytest.approx(total)
        assert sum(m[p] ** 2 * b for p, b in UNEVEN.items()) == pytest.approx(total**2 / 8)
    assert SignedNoiseTeacher(small_batch=256, seed=0).multipliers(UNEVEN) == dict.fromkeys(UNEVEN, 1.0)  # b_s >= B


def test_sums_only_aggregate_has_mean_mu_and_small_batch_covariance():
    mu, chol, gen = _problem(3)
    small, pids = 8, list(range(len(BATCHES)))
    batches = dict(zip(pids, BATCHES))
    teacher = SignedNoiseTeacher(small_batch=small, seed=5)
    outs = []
    for _ in range(4000):
        m = teacher.multipliers(batches)
        g = _client_grads(mu, chol, gen, BATCHES)
        replies = [[m[p] * gi[0]] for p, gi in zip(pids, g)]  # what the clients send
        outs.append(weighted_mean(replies, BATCHES)[0].double())  # the server's usual mean: only the sum matters
    outs = torch.stack(outs)
    sigma = chol @ chol.T
    target = sigma / small
    err = float((outs.mean(0) - mu).norm())
    assert err < 3 * math.sqrt(float(target.trace()) / len(outs)), f"mean off by {err:.3f}"
    cov = torch.cov(outs.T)
    assert float(cov.trace() / target.trace()) == pytest.approx(1.0, abs=0.10)
    assert float((cov - target).norm() / target.norm()) < 0.15  # the whole matrix, not just its trace
    assert float(target.trace()) / 4 > float(sigma.trace()) / sum(BATCHES)  # plain G has only Sigma / B


def test_stats_from_sums_equal_the_per_client_statistics():
    mu, chol, gen = _problem(4)
    for _ in range(20):
        g = _client_grads(mu, chol, gen, BATCHES)
        G = weighted_mean(g, BATCHES)
        per_client = noise_stats(G, g, BATCHES)
        sums = noise_stats_from_sums(sum(b * sq_norm(gi) for b, gi in zip(BATCHES, g)), sum(BATCHES), len(BATCHES),
                                     sq_norm(G))
        assert sums.tr_sigma == pytest.approx(per_client.tr_sigma, rel=1e-5)
        assert sums.grad_sq == pytest.approx(per_client.grad_sq, rel=1e-5, abs=1e-6)
        assert sums.grad_norm == pytest.approx(per_client.grad_norm, rel=1e-6)


def test_stats_from_sums_are_unbiased_with_multipliers():
    mu, chol, gen = _problem(5)
    pids = list(range(len(BATCHES)))
    batches = dict(zip(pids, BATCHES))
    teacher = SignedNoiseTeacher(small_batch=8, seed=2)
    tr, sq = [], []
    for _ in range(6000):
        m = teacher.multipliers(batches)
        g = _client_grads(mu, chol, gen, BATCHES)
        G_tilde = weighted_mean([[m[p] * gi[0]] for p, gi in zip(pids, g)], BATCHES)
        s = noise_stats_from_sums(sum(b * sq_norm(gi) for b, gi in zip(BATCHES, g)), sum(BATCHES), len(BATCHES),
                                  sq_norm(G_tilde), sum(m[p] ** 2 * b for p, b in batches.items()))
        tr.append(s.tr_sigma)
        sq.append(s.grad_sq)
    true_tr, true_sq = float((chol @ chol.T).trace()), float(mu @ mu)
    # standard errors of the two means here: 2.0% and 0.3% (the sums carry the noise they measure)
    assert sum(tr) / len(tr) == pytest.approx(true_tr, rel=0.07)
    assert sum(sq) / len(sq) == pytest.approx(true_sq, rel=0.02)


def test_teacher_returns_the_aggregate_and_restores_its_signs():
    a, b = SignedNoiseTeacher(8, seed=3), SignedNoiseTeacher(8, seed=3)
    for _ in range(3):
        a.plan(1, UNEVEN)
    b.load_state_dict(a.state_dict())
    assert a.plan(4, UNEVEN).grad_scale == b.plan(4, UNEVEN).grad_scale
    G = [torch.ones(DIM)]
    out = a(TeacherInput(G, [G] * 8, list(UNEVEN.values()), 4))
    assert out.grad is G and out.metrics["beta"] == pytest.approx(math.sqrt(15))
