"""Gradient inversion (experiments/privacy_attack.py, experiments/bench_privacy.py): scores, labels, the attack."""

from __future__ import annotations

import math

import pytest
import torch

from experiments import bench_privacy as bp
from experiments import privacy_attack as pa
from workloads.data import load_splits
from workloads.models import build_model
from workloads.registry import WORKLOADS


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_identical_images_score_inf_and_one():
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(pa.psnr(x, x.clone())).all()
    assert pa.ssim(x, x.clone()).tolist() == pytest.approx([1.0] * 3, abs=1e-12)


def test_psnr_of_a_known_shift():
    # Prepare: pixels 0.5, then shifted by 0.1 (MSE 0.01) and by 0.3 on a 0-255 scale (MSE 0.09 * 255^2 / 255^2)
    x = torch.full((2, 1, 8, 8), 0.5, dtype=torch.float64)
    # Execute / Assert: 10 log10(1 / 0.01) = 20 dB; data range 255 with values x 255: the same 20 dB
    assert pa.psnr(x + 0.1, x).tolist() == pytest.approx([20.0, 20.0], abs=1e-9)
    assert pa.psnr(255 * (x + 0.1), 255 * x, data_range=255).tolist() == pytest.approx([20.0, 20.0], abs=1e-9)
    assert float(pa.psnr(x + 0.3, x)[0]) == pytest.approx(10 * math.log10(1 / 0.09), abs=1e-9)


def test_ssim_of_flat_images_is_the_luminance_term():
    # Flat images have no variance: SSIM = (2 a b + c1) / (a^2 + b^2 + c1), c1 = 0.01^2
    a, b, c1 = 0.5, 0.25, 1e-4
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # 0.80006...
    got = pa.ssim(torch.full((1, 3, 16, 16), b), torch.full((1, 3, 16, 16), a))
    assert float(got[0]) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.800064, abs=1e-6)


def test_ssim_falls_with_noise():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 8, 8, generator=gen)
    noise = torch.randn(1, 1, 8, 8, generator=gen)
    scores = [float(pa.ssim(x + s * noise, x)[0]) for s in (0.0, 0.05, 0.2, 1.0)]
    assert scores[0] == pytest.approx(1.0) and scores == sorted(scores, reverse=True) and scores[-1] < 0.3


def test_matching_undoes_a_permutation():
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert pa.match_images(x[perm], x).tolist() == torch.argsort(perm).tolist()
    # more reconstructions than originals (the secure sum): each original finds its own
    assert pa.match_images(x, x[:2] + 0.01).tolist() == [0, 1]


def test_idlg_label_is_exact_at_b1():
    splits, w = load_splits("digits"), WORKLOADS["digits"]
    for name in ("mlp", "cnn"):
        net = build_model(name, w.input_shape, w.num_classes, 1)
        for k in range(10):
            g = bp.reply(net, w.loss(), splits, splits.x_train[k:k + 1], splits.y_train[k:k + 1])
            assert pa.idlg_label(g[-1]) == int(splits.y_train[k])


def test_label_counts_from_a_hand_made_bias_gradient():
    # Uniform softmax p = 1/10; labels 1, 1, 3, 7: dL/db_c = 1/10 - n_c / 4
    counts = torch.bincount(torch.tensor([1, 1, 3, 7]), minlength=10).double()
    grad = 0.1 - counts / 4
    assert pa.label_counts(grad, 4).tolist() == [1, 1, 3, 7]
    assert pa.label_counts(grad, 1).tolist() == [1]  # argmin


def test_clip_and_noise_scales_and_noises():
    g = [torch.full((10,), 3.0), torch.full((6,), 4.0)]  # |g| = sqrt(90 + 96)
    gen = torch.Generator().manual_seed(0)
    out = pa.clip_and_noise(g, clip=0.5, z=0.0, weight=1.0, total=8.0, generator=gen)
    assert math.sqrt(sum(float((t**2).sum()) for t in out)) == pytest.approx(0.5 / 8, rel=1e-6)
    noised = pa.clip_and_noise([torch.zeros(200_000)], clip=0.5, z=4.0, weight=1.0, total=8.0, generator=gen)
    assert float(noised[0].std()) == pytest.approx(4.0 * 0.5 / 8, rel=0.01)


def test_one_digit_is_rebuilt_from_its_plain_reply_but_not_through_dp():
    # Measured (200 Adam steps, seed 0): plain 30.3 dB, DP 6.9 dB, uniform noise 4.9 dB
    plain, orig, rec = bp.run_case(bp.Case("digits", "mlp", 1, "plain", 200), "")
    dp, _, _ = bp.run_case(bp.Case("digits", "mlp", 1, "dp", 200), "")
    assert plain["label_acc"] == 1.0 and plain["labels"] == "idlg"
    assert plain["psnr"] > 25 and plain["ssim"] > 0.95
    assert plain["psnr"] > dp["psnr"] + 15
    assert plain["psnr"] > plain["psnr_noise"] + 15
    # the training set's mean image (11.1 dB) uses no gradient; the DP reconstruction does worse than it
    assert plain["psnr"] > plain["psnr_mean_image"] + 10 and dp["psnr"] < dp["psnr_mean_image"]
    assert dp["noise_to_signal"] > 100
    assert float(pa.psnr(rec, orig)[0]) == pytest.approx(plain["psnr"])


def test_clip_and_noise_is_private_mean():
    privacy = pytest.importorskip("strategies.privacy")  # client-level DP
    gen = torch.Generator().manual_seed(3)
    g = [torch.randn(30, 4, generator=gen), torch.randn(4, generator=gen)]
    ours = pa.clip_and_noise(g, 0.5, 2.0, 1.0, 8.0, torch.Generator().manual_seed(0))
    theirs = privacy.private_mean([g], [4], [4] * 8, 0.5, 2.0, torch.Generator().manual_seed(0))[0]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
