"""What a FedSGD server can rebuild from what it holds: gradient inversion, plain, with DP and behind SecAgg.

``python -m experiments.bench_privacy [--quick] [--data-dir DIR] [--out CSV] [--figure PNG]``

Honest-but-curious server; the attack is Inverting Gradients (Geiping et al. 2020; see
experiments/privacy_attack.py) on models at initialisation (seed 1) unless the case says
``trained``. Each case gives a mean-gradient vector and the number of images behind it:

- ``plain``: one client's reply g_i at b_i images, computed as the client does
  (``workloads.training.batch_gradient``: gradient of the mean loss over the batch);
- ``dp``: that client's term of the DP-FedSGD aggregate, w_i clip_C(g_i) / W + N(0, (z C / W)^2),
  K = 8 equal clients (w_i = 1, W = 8), C = 0.5, z from Opacus' ``get_noise_multiplier`` for
  epsilon 8 at delta 1e-5, q = 1, 40 rounds; the other clients' terms are taken as known (best
  case for the attacker);
- ``secagg``: the b_i-weighted mean over K = 8 clients, which is all SecAgg+ lets the server
  see; attacked as one batch of sum b_i images, scored on client 0's images (best match).

Labels: iDLG at b = 1, the bias-gradient count estimate for larger batches (at init), or the
true labels (``known``) for the trained model at b > 1. Scores per case: PSNR (dB, pixels in
[0, 1]) and SSIM, mean over the target client's images after Hungarian matching, next to two
baselines that use no gradient: uniform noise, and the training set's mean image.
``secagg_rel_diff`` and ``secagg_round_ratio`` come from experiments/bench_secagg.py (12 rounds;
4 with ``--quick``). ``epsilon``, ``dp_test_accuracy``, ``plain_test_accuracy``: two in-process
runs, digits MLP, 8 clients, 40 rounds (10 with ``--quick``), with DP at target epsilon 8 and
without (nan where strategies/privacy.py is missing). The DP attack uses that module's
``private_mean``, else the same formula written here (``privacy_attack.clip_and_noise``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from experiments import privacy_attack as pa
from workloads.data import Splits, load_splits
from workloads.files import atomic_save_figure
from workloads.models import build_model
from workloads.registry import WORKLOADS
from workloads.training import batch_gradient, evaluate

CLIENTS = 8  # K, all sampled every round (q = 1)
DP = {"clip": 0.5, "epsilon": 8.0, "delta": 1e-5, "rounds": 40}  # C, target epsilon, delta, rounds
QUICK_ROUNDS = 10  # --quick: the DP and plain training runs' rounds
MODEL_SEED, DATA_SEED = 1, 0
RESULTS = Path(__file__).resolve().parent / "results"
FIGURE = Path(__file__).resolve().parent.parent / "docs" / "privacy_attack.png"


@dataclass(frozen=True)
class Case:
    """One attack: the workload, the client's batch b_i, what the server holds, the model's state."""

    dataset: str
    model: str
    b: int  # b_i, the target client's batch (examples)
    mode: str  # plain | dp | secagg
    iters: int  # Adam steps of the reconstruction
    trained: bool = False  # after TRAIN_STEPS centralised SGD steps, else at initialisation
    rounds: int = DP["rounds"]  # the DP run's rounds (z is chosen for them)

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.model}-{self.mode}-b{self.b}" + ("-trained" if self.trained else "")


TRAIN_STEPS, TRAIN_BATCH = 300, 64  # the "trained" model: SGD, momentum 0.9, batches drawn with replacement
TRAIN_LR = {"digits": 0.1, "cifar10": 0.02}


def cases(quick: bool) -> list[Case]:
    """The cases; ``--quick``: the last line's, digits MLP at init, 200 steps, DP for QUICK_ROUNDS rounds."""
    if quick:
        return [Case("digits", "mlp", 1, "plain", 200), Case("digits", "mlp", 4, "plain", 200),
                Case("digits", "mlp", 16, "plain", 200), Case("digits", "mlp", 1, "dp", 200, rounds=QUICK_ROUNDS),
                Case("digits", "mlp", 1, "secagg", 200)]
    out = [Case("digits", m, b, "plain", 1000) for m in ("mlp", "cnn") for b in (1, 4, 16)]
    out += [Case("digits", "mlp", 64, "plain", 1000), Case("digits", "mlp", 128, "plain", 1000)]
    out += [Case("cifar10", "cnn", b, "plain", 1000) for b in (1, 4, 16)]
    out += [Case("digits", "mlp", 1, "plain", 1000, True), Case("digits", "mlp", 4, "plain", 1000, True),
            Case("cifar10", "cnn", 1, "plain", 1000, True)]
    out += [Case("digits", "mlp", 1, "dp", 1000), Case("digits", "mlp", 4, "dp", 1000), Case("cifar10", "cnn", 1, "dp", 1000)]
    out += [Case("digits", "mlp", b, "secagg", 1000) for b in (1, 4, 16)] + [Case("cifar10", "cnn", 1, "secagg", 500)]
    return out


@functools.lru_cache(maxsize=8)
def attacked_model(dataset: str, model: str, trained: bool, data_dir: str) -> torch.nn.Module:
    """The global model the server sent: seed ``MODEL_SEED`` at init, or after TRAIN_STEPS SGD steps."""
    w = WORKLOADS[dataset]
    net = build_model(model, w.input_shape, w.num_classes, MODEL_SEED)
    if trained:
        splits, loss = load_splits(dataset, data_dir), w.loss()
        gen = torch.Generator().manual_seed(MODEL_SEED)
        opt = torch.optim.SGD(net.parameters(), lr=TRAIN_LR[dataset], momentum=0.9)
        for _ in range(TRAIN_STEPS):
            idx = torch.randint(len(splits.y_train), (TRAIN_BATCH,), generator=gen)
            batch_gradient(net, loss, splits.inputs, splits.x_train[idx], splits.y_train[idx])
            opt.step()
    return net


@functools.lru_cache(maxsize=8)
def model_accuracy(dataset: str, model: str, trained: bool, data_dir: str) -> float:
    """Test accuracy of the attacked model (about 0.1 at initialisation)."""
    splits, w = load_splits(dataset, data_dir), WORKLOADS[dataset]
    net = attacked_model(dataset, model, trained, data_dir)
    return evaluate(net, w.loss(), splits.inputs, splits.x_test, splits.y_test)[1]


def client_batches(splits: Splits, clients: int, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint batches of ``b`` training examples for ``clients`` clients (fixed seed); client 0 is the target."""
    idx = torch.randperm(len(splits.y_train), generator=torch.Generator().manual_seed(DATA_SEED))
    return [(splits.x_train[idx[k * b:(k + 1) * b]], splits.y_train[idx[k * b:(k + 1) * b]]) for k in range(clients)]


def reply(net: torch.nn.Module, loss, splits: Splits, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """g_i as the client computes it: d(mean loss over its batch)/dw."""
    batch_gradient(net, loss, splits.inputs, x, y)
    return [p.grad.detach().clone() for p in net.parameters()]


@functools.lru_cache(maxsize=2)
def noise_multiplier(rounds: int) -> float:
    """z for epsilon DP['epsilon'] at DP['delta'] after ``rounds`` rounds at q = 1 (Opacus, RDP)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=DP["epsilon"], target_delta=DP["delta"], sample_rate=1.0,
                                      steps=rounds, accountant="rdp"))


def dp_term(g: list[torch.Tensor], b: int, z: float) -> tuple[list[torch.Tensor], str]:
    """Client 0's term of the DP aggregate, K equal clients: strategies/privacy.py's ``private_mean`` when
    present, else the same formula here (privacy_attack.clip_and_noise); and which one ran."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    try:
        from strategies.privacy import private_mean
    except ImportError:
        return pa.clip_and_noise(g, DP["clip"], z, 1.0, CLIENTS, gen), "local"
    return private_mean([g], [b], [b] * CLIENTS, DP["clip"], z, gen)[0], "strategies.privacy"


def server_view(case: Case, net, loss, splits: Splits) -> tuple[list[torch.Tensor], int, dict]:
    """(the gradient the server attacks, images behind it, extra CSV fields) for ``case``."""
    batches = client_batches(splits, CLIENTS, case.b)
    g = reply(net, loss, splits, *batches[0])
    if case.mode == "plain":
        return g, case.b, {}
    if case.mode == "dp":
        z = noise_multiplier(case.rounds)
        noised, impl = dp_term(g, case.b, z)
        norm = math.sqrt(sum(float((t**2).sum()) for t in g))
        noise = z * DP["clip"] / CLIENTS * math.sqrt(sum(t.numel() for t in g))  # E|N| = sigma sqrt(D)
        return noised, case.b, {"z": z, "sigma": z * DP["clip"] / CLIENTS, "dp_impl": impl,
                                "noise_to_signal": noise / (min(norm, DP["clip"]) / CLIENTS)}
    grads = [g] + [reply(net, loss, splits, *xy) for xy in batches[1:]]
    total = sum(len(y) for _, y in batches)
    mean = [sum(len(y) / total * c[j] for c, (_, y) in zip(grads, batches)) for j in range(len(g))]
    return mean, total, {}


def run_case(case: Case, data_dir: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Attack one case; returns its CSV row, client 0's images and their matched reconstructions ([0, 1])."""
    w, splits = WORKLOADS[case.dataset], load_splits(case.dataset, data_dir)
    net, loss = attacked_model(case.dataset, case.model, case.trained, data_dir), w.loss()
    target, n, extra = server_view(case, net, loss, splits)
    batches = client_batches(splits, CLIENTS, case.b)
    true_all = torch.cat([y for _, y in batches[: CLIENTS if case.mode == "secagg" else 1]])
    if case.trained and n > 1:
        labels, how = true_all.sort().values, "known"
    else:
        labels, how = pa.label_counts(target[-1], n), "idlg" if n == 1 else "counts"
    box = (-splits.mean / splits.std, (1 - splits.mean) / splits.std)
    start = time.process_time()
    x_rec, dist = pa.invert_gradients(net, loss, target, labels, w.input_shape, box, iters=case.iters, seed=DATA_SEED)
    attack_s = time.process_time() - start
    recon = (x_rec * splits.std + splits.mean).clamp(0, 1)
    orig = batches[0][0].float() / splits.max_value
    matched = recon[pa.match_images(recon, orig)]
    noise = torch.rand(orig.shape, generator=torch.Generator().manual_seed(DATA_SEED))
    prior = (splits.x_train.float().mean(0, keepdim=True) / splits.max_value).expand_as(orig)  # no gradient used
    row = {"case": case.name, **asdict(case), "images": n, "labels": how, "label_acc": label_accuracy(labels, true_all),
           "psnr": float(pa.psnr(matched, orig).mean()), "ssim": float(pa.ssim(matched, orig).mean()),
           "psnr_noise": float(pa.psnr(noise, orig).mean()), "ssim_noise": float(pa.ssim(noise, orig).mean()),
           "psnr_mean_image": float(pa.psnr(prior, orig).mean()), "ssim_mean_image": float(pa.ssim(prior, orig).mean()),
           "cos_distance": dist,
           "model_test_acc": model_accuracy(case.dataset, case.model, case.trained, data_dir), "attack_cpu_s": attack_s, **extra}
    if case.mode == "secagg":  # every client's images, not only the target's
        everyone = torch.cat([x for x, _ in batches]).float() / splits.max_value
        row["psnr_all_clients"] = float(pa.psnr(recon[pa.match_images(recon, everyone)], everyone).mean())
    return row, orig, matched


def label_accuracy(labels: torch.Tensor, true: torch.Tensor) -> float:
    """Share of the true label multiset recovered: sum_c min(n_c, n'_c) / b."""
    a, b = torch.bincount(labels, minlength=10), torch.bincount(true, minlength=10)
    return float(torch.minimum(a, b).sum()) / len(true)


def secagg_fields(quick: bool) -> tuple[float, float]:
    """(secagg_rel_diff, secagg_round_ratio) from experiments/bench_secagg.py, digits MLP, 8 clients."""
    from experiments.bench_secagg import measure, step_difference

    rounds = 4 if quick else 12
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rel, _ = step_difference(CLIENTS, root)
        plain, secure = (measure(s, rounds, CLIENTS, "inprocess", root) for s in (False, True))
    return rel, secure["s_per_round"] / plain["s_per_round"]


def training_fields(rounds: int) -> tuple[float, float, float]:
    """(epsilon, DP test accuracy, plain test accuracy): digits MLP, K = 8 clients all sampled, ``rounds``
    rounds each, DP at C = DP['clip'] and dp-target-epsilon DP['epsilon']; nan without strategies/privacy.py."""
    try:
        import strategies.privacy  # noqa: F401 - client-level DP
    except ImportError:
        return math.nan, math.nan, math.nan
    from flb.inprocess import run_inprocess

    base = {"dataset": "digits", "model": "mlp", "seed": MODEL_SEED, "num-server-rounds": rounds, "eval-every": rounds,
            "max-norm-ratio": 0}
    dp = {"dp-clip-norm": DP["clip"], "dp-target-epsilon": DP["epsilon"], "dp-delta": DP["delta"],
          "dp-noise-seed": MODEL_SEED}  # reproducible noise
    with tempfile.TemporaryDirectory() as tmp:
        outs = [run_inprocess(base | extra | {"out-dir": f"{tmp}/{k}"}, CLIENTS) for k, extra in enumerate((dp, {}))]
        eps = json.loads((outs[0] / "privacy.json").read_text())["dp_epsilon"]
        acc = [float(pd.read_csv(o / "rounds.csv")["test_accuracy"].dropna().iloc[-1]) for o in outs]
    return float(eps), acc[0], acc[1]


def figure(shown: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path, columns: int = 4) -> None:
    """Rows: cases; per image an (original | reconstruction) pair; at most ``columns`` images a case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 2 * columns, figsize=(2 * columns * 0.9, len(shown) * 1.0))
    for r, (name, orig, rec) in enumerate(shown):
        for c in range(columns):
            for k, img in enumerate((orig, rec)):
                ax = axes[r, 2 * c + k]
                ax.axis("off")
                if c < len(img):
                    ax.imshow(img[c].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
                if r == 0:
                    ax.set_title(("original", "rebuilt")[k], fontsize=7)
        axes[r, 0].text(-0.3, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.3, wspace=0.05, hspace=0.1)
    atomic_save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def last_line(rows: pd.DataFrame, rel: float, ratio: float, trained: tuple[float, float, float]) -> str:
    """The issue's summary line; PSNR fields from the digits MLP at init (b_i = 1, 16; DP b_i = 1; SecAgg K x 1)."""
    def get(mode: str, b: int) -> float:
        sel = rows[(rows.dataset == "digits") & (rows.model == "mlp") & (rows["mode"] == mode) & (rows.b == b) & ~rows.trained]
        return float(sel.psnr.iloc[0]) if len(sel) else math.nan

    eps, dp_acc, plain_acc = trained
    return (f"secagg_rel_diff={rel:.3g} secagg_round_ratio={ratio:.3g} psnr_plain_b1={get('plain', 1):.3g} "
            f"psnr_plain_b16={get('plain', 16):.3g} psnr_dp={get('dp', 1):.3g} psnr_secagg={get('secagg', 1):.3g} "
            f"epsilon={eps:.4g} dp_test_accuracy={dp_acc:.4g} plain_test_accuracy={plain_acc:.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the last line's cases only, 200 steps (digits MLP)")
    parser.add_argument("--data-dir", default="", help="folder of the .npz archives (else $FLB_DATA_DIR)")
    parser.add_argument("--out", default="", help="CSV path (default experiments/results/bench_privacy[_quick].csv)")
    parser.add_argument("--figure", default="", help=f"PNG path (default {FIGURE} for the full run, none for --quick)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wall, cpu = time.perf_counter(), time.process_time()
    rows, shown = [], []
    for case in cases(args.quick):
        row, orig, rec = run_case(case, args.data_dir)
        rows.append(row)
        shown.append((case.name, orig, rec))
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out or RESULTS / f"bench_privacy{'_quick' if args.quick else ''}.csv")
    table.to_csv(out, index=False, float_format="%.6g")
    if args.figure or not args.quick:
        figure(shown, Path(args.figure or FIGURE))
    rel, ratio = secagg_fields(args.quick)
    trained = training_fields(QUICK_ROUNDS if args.quick else DP["rounds"])
    print(f"total_cpu_s={time.process_time() - cpu:.0f} wall_s={time.perf_counter() - wall:.0f}")
    print(last_line(table, rel, ratio, trained))


if __name__ == "__main__":
    main()
