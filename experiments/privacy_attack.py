"""Gradient inversion: what an honest-but-curious server can rebuild from a FedSGD gradient.

Pure functions on a model, a target gradient and tensors; no Flower. Used by
``experiments/bench_privacy.py`` and its tests.

- Labels. iDLG (Zhao, Mopuri and Bilen 2020): for one example and softmax cross-entropy the
  last layer's bias gradient is p - onehot(y), negative only at the true label. For a batch of
  b, b * dL/db_c = sum_j p_jc - n_c (n_c examples of class c), so
  n_c ~ b * (pbar_c - dL/db_c) with pbar the mean softmax; at initialisation pbar ~ 1/C
  (the count estimate of Wainakh et al. 2022, "User-level label leakage"). Counts are rounded
  by largest remainder to sum to b.
- Reconstruction. Inverting Gradients (Geiping, Bauermeister, Droege and Moeller, NeurIPS 2020):
  minimise 1 - cos(grad_w L(x', y), g) + alpha * TV(x') over dummy inputs x' in the model's
  (normalised) input space, Adam on the sign of the gradient, step decay x0.1 at 3/8, 5/8, 7/8
  of the iterations, x' clamped to the box of valid pixels after every step. DLG (Zhu, Liu and
  Han, NeurIPS 2019) matches in L2 with L-BFGS instead; cosine matching ignores the gradient's
  scale, so a clipped or 1/K-weighted gradient is as good as the raw one.
- Scores. Reconstructions are assigned to originals by the Hungarian method on MSE (scipy);
  PSNR = 10 log10(R^2 / MSE) dB with R the data range (1 for pixels in [0, 1]); SSIM (Wang,
  Bovik, Sheikh and Simoncelli 2004) with a Gaussian window (11 px, sigma 1.5, shrunk to the
  image), K1 = 0.01, K2 = 0.03, averaged over valid windows and channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (N, C, H, W) batches: 10 log10(R^2 / MSE); inf where equal."""
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """(size, size) Gaussian kernel summing to 1."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of (N, C, H, W) batches (Wang et al. 2004), mean over valid windows and channels.

    SSIM = (2 mu_x mu_y + c1)(2 s_xy + c2) / ((mu_x^2 + mu_y^2 + c1)(s_x^2 + s_y^2 + c2)),
    c1 = (0.01 R)^2, c2 = (0.03 R)^2; the window is shrunk to the largest odd size <= min(H, W).
    """
    size = min(size, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2
    channels = x.shape[1]
    w = gaussian_window(size, sigma).expand(channels, 1, size, size)
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(t, w, groups=channels)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def match_images(recon: torch.Tensor, originals: torch.Tensor) -> np.ndarray:
    """For each original, the index of its reconstruction: Hungarian assignment on per-pair MSE.

    ``recon`` may hold more images than ``originals`` (the secure sum's union batch); each
    reconstruction is used at most once.
    """
    cost = torch.cdist(originals.flatten(1).double(), recon.flatten(1).double()) ** 2
    rows, cols = linear_sum_assignment(cost.numpy())
    out = np.empty(len(originals), dtype=np.int64)
    out[rows] = cols
    return out


def idlg_label(bias_grad: torch.Tensor) -> int:
    """iDLG's label for one example: the index of the (only) negative last-layer bias gradient."""
    return int(torch.argmin(bias_grad))


def label_counts(bias_grad: torch.Tensor, b: int, pbar: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted labels of a batch of ``b`` from the last layer's mean bias gradient (module docstring).

    n_c ~ b (pbar_c - dL/db_c), clipped at 0 and rounded by largest remainder to sum to b;
    ``pbar`` (mean softmax) defaults to uniform, right at initialisation. b = 1 is iDLG.
    """
    if b == 1:
        return torch.tensor([idlg_label(bias_grad)])
    g = bias_grad.double()
    pbar = torch.full_like(g, 1 / len(g)) if pbar is None else pbar.double()
    est = (b * (pbar - g)).clamp_min(0)
    est = est * (b / est.sum()) if est.sum() > 0 else torch.full_like(g, b / len(g))
    counts = est.floor().long()
    short = b - int(counts.sum())
    counts[torch.argsort(est - counts, descending=True)[:short]] += 1
    return torch.repeat_interleave(torch.arange(len(g)), counts)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean |x[h+1] - x[h]| + mean |x[w+1] - x[w]| over the batch."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def cosine_distance(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """1 - <g', g> / (|g'| |g|) over all tensors together (Geiping et al. 2020, eq. 4)."""
    dot = sum((a * b).sum() for a, b in zip(grads, target))
    na = sum((a * a).sum() for a in grads).sqrt()
    nb = sum((b * b).sum() for b in target).sqrt()
    return 1 - dot / (na * nb + 1e-12)


def invert_gradients(
    model: nn.Module, loss_fn: nn.Module, target: Sequence[torch.Tensor], labels: torch.Tensor,
    input_shape: Sequence[int], box: tuple[torch.Tensor, torch.Tensor], iters: int = 300, lr: float = 0.1, tv: float = 1e-2,
    restarts: int = 1, seed: int = 0,
) -> tuple[torch.Tensor, float]:
    """Rebuild a batch from its mean gradient ``target``; returns (inputs, final cosine distance).

    ``input_shape`` is (C, H, W); ``box`` = (lo, hi), broadcastable to it (e.g. (C, 1, 1)): the
    normalised values of black and white pixels. ``loss_fn`` sums over the batch (the workload's loss); the dummy gradient is
    of that sum / len(labels), as the client computes it. The restart with the lowest cosine
    distance is kept.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    target = [t.detach() for t in target]
    lo, hi = box
    shape = (len(labels), *input_shape)
    best, best_loss = None, math.inf
    gen = torch.Generator().manual_seed(seed)
    for _ in range(restarts):
        x = torch.randn(shape, generator=gen).clamp_(lo, hi).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [iters * 3 // 8, iters * 5 // 8, iters * 7 // 8], 0.1)
        for _ in range(iters):
            opt.zero_grad()
            grads = torch.autograd.grad(loss_fn(model(x), labels) / len(labels), params, create_graph=True)
            rec = cosine_distance(grads, target)
            (rec + tv * total_variation(x)).backward()
            x.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
        final = float(rec.detach())
        if final < best_loss:
            best, best_loss = x.detach().clone(), final
    return best, best_loss


def clip_and_noise(
    grads: Sequence[torch.Tensor], clip: float, z: float, weight: float, total: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """One client's term of the DP-FedSGD aggregate: w clip_C(g) / W + N(0, (z C / W)^2) per coordinate.

    clip_C(g) = g min(1, C / |g|) over all tensors together (McMahan et al. 2018). With one client
    and the rest of the sum known this is what the released aggregate leaks about it.
    """
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in grads))
    scale = weight * (min(1.0, clip / norm) if norm > 0 else 1.0) / total
    sigma = z * clip / total
    return [t * scale + sigma * torch.randn(t.shape, generator=generator) for t in grads]
