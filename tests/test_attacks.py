"""The Byzantine attacks of experiments/attacks.py, by hand."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import norm
from torch import nn

from experiments.attacks import alie, alie_z, bit_flip, flip_labels, ipm, label_flip, momentum_space, sign_flip
from strategies.robust import worker_momenta
from workloads.training import batch_gradient


def test_alie_z_matches_the_paper_formula():
    # n = 20, f = 4: s = floor(11) - 4 = 7, z = Phi^-1(13 / 20)
    assert alie_z(20, 4) == pytest.approx(norm.ppf(0.65), abs=1e-9)
    assert alie_z(20, 4) == pytest.approx(0.3853, abs=1e-4)
    # n = 25, f = 5 (Karimireddy et al.'s setting): s = floor(13.5) - 5 = 8, Phi^-1(17 / 25)
    assert alie_z(25, 5) == pytest.approx(norm.ppf(17 / 25), abs=1e-9)
    with pytest.raises(ValueError):
        alie_z(10, 0)


def test_alie_is_mean_minus_z_std_per_coordinate():
    honest = torch.tensor([[1.0, 0.0, 5.0], [3.0, 0.0, 7.0], [5.0, 0.0, 9.0]])
    z = alie_z(20, 4)
    # per coordinate: mean 3, 0, 7; sample std 2, 0, 2
    torch.testing.assert_close(alie(honest, 20, 4), torch.tensor([3.0 - 2 * z, 0.0, 7.0 - 2 * z]))


def test_ipm_and_sign_flip():
    honest = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    torch.testing.assert_close(ipm(honest), torch.tensor([-0.2, -0.1]))
    torch.testing.assert_close(ipm(honest, epsilon=2.0), torch.tensor([-4.0, -2.0]))
    assert torch.equal(sign_flip(torch.tensor([1.5, -0.25, 0.0])), torch.tensor([-1.5, 0.25, -0.0]))


def test_bit_flip_changes_one_bit_in_one_percent_of_the_entries():
    g = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    before = g.clone()
    out = bit_flip(g, torch.Generator().manual_seed(1))
    assert torch.equal(g.view(torch.int32), before.view(torch.int32))  # the input is left as it was
    diff = torch.bitwise_xor(out.view(torch.int32), g.view(torch.int32))
    changed = diff != 0
    assert int(changed.sum()) == 100
    flipped = diff[changed].to(torch.int64) & 0xFFFFFFFF  # as unsigned 32-bit words
    assert all(bin(int(v)).count("1") == 1 for v in flipped)  # exactly one bit each
    assert len({int(v).bit_length() - 1 for v in flipped}) > 20  # the bits vary over (almost) all 32
    # a 2-D tensor keeps its shape; a tiny one still gets one flipped entry
    assert bit_flip(torch.ones(3, 4), torch.Generator().manual_seed(0)).shape == (3, 4)
    assert int((bit_flip(torch.ones(5), torch.Generator().manual_seed(0)) != 1).sum()) == 1


def test_flip_labels_and_the_label_flip_gradient():
    assert flip_labels(torch.tensor([0, 1, 4, 9]), 10).tolist() == [9, 8, 5, 0]
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    got = label_flip(model, loss_fn, lambda t: t, x, y, 3)
    batch_gradient(model, loss_fn, lambda t: t, x, torch.tensor([2, 1, 0, 2, 1, 0]))
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_momentum_space_gives_the_attackers_the_momentum_they_choose_through_the_servers_formula():
    """Two rounds, 3 honest partitions (2..4), 2 attackers (0, 1): what the server's ``worker_momenta`` makes of the
    sent gradients is the paper's attack on the honest momenta, by hand."""
    beta, n = 0.9, 5
    gen = torch.Generator().manual_seed(0)
    tracked, server = {}, {}
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    decay = 5e-4 * weights
    for _ in range(2):
        grads = {p: torch.randn(4, generator=gen) for p in range(n)}
        honest = torch.stack([beta * server.get(p, torch.zeros(4)) + grads[p] + decay for p in (2, 3, 4)])
        sent = momentum_space(grads, [0, 1], "alie", tracked, beta, decay, n)
        for p in (2, 3, 4):
            assert torch.equal(sent[p], grads[p])  # honest clients untouched
        # the server adds the weight decay to each gradient, then m_i = beta * m_i + g_i
        with_decay = [[sent[p] + decay] for p in range(n)]
        server = {p: m[0] for p, m in worker_momenta(with_decay, list(range(n)), beta,
                                                     {p: [m] for p, m in server.items()}, None).items()}
        expected = honest.mean(0) - alie_z(n, 2) * honest.std(0)
        for p in (0, 1):
            torch.testing.assert_close(server[p], expected, rtol=1e-5, atol=1e-6)
        for p in range(n):
            torch.testing.assert_close(tracked[p], server[p], rtol=1e-5, atol=1e-6)
    # sign flip: the attacker's momentum is its raw vector, whatever it sent before
    prev = tracked[0].clone()
    flipped = momentum_space({0: torch.ones(4), 2: torch.zeros(4)}, [0], "sign-flip", tracked, beta, decay, n)
    torch.testing.assert_close(flipped[0], torch.ones(4) - beta * prev - decay)
    with pytest.raises(ValueError, match="kind 'bit-flip'"):
        momentum_space({0: torch.ones(4), 2: torch.zeros(4)}, [0], "bit-flip", {}, beta, decay, n)
