"""Secure aggregation (``secure-aggregation``): the secure step equals the plain one within the quantisation bound.

The real ServerApp and ClientApp run in process (flb/inprocess.py) with Flower's SecAgg+
workflow and mod; a client is dropped at a chosen SecAgg+ stage by ``StageDrop``. The step
G is read from the model: with lr = 1, no momentum, no weight decay and one round, w_1 = w_0 - G.
"""

from __future__ import annotations

import hashlib
import importlib
import math

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client_app.app import app as client_app
from experiments.faults import Fault, FaultyClientApp
from flb.inprocess import run_inprocess
from protocol.secure import SERVER_WORKFLOW, read_secure_mean, secure_vector, shake_mask
from strategies.large_batch import RoundFailure
from strategies.secure import check_secure, quantisation_bound, secagg_params
from strategies.secure_round import SecureLargeBatchStrategy  # noqa: F401 - installs the server's masks
from workloads.config import RunConfig
from workloads.errors import ConfigError
from workloads.models import build_model
from workloads.registry import WORKLOADS, resolve_model

STEP = {"num-server-rounds": 1, "eval-every": 1, "global-batch-size": 64, "lr": 1.0, "schedule": "constant",
        "warmup-rounds": 0, "momentum": 0.0, "weight-decay": 0.0, "seed": 3}


class StageDrop:
    """The real ClientApp, except that partition ``pid`` raises at SecAgg+ stage ``stage`` (a dropout)."""

    def __init__(self, pids: set[int], stage: str) -> None:
        self.pids, self.stage = pids, stage

    def __call__(self, msg, context):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and configs.get("stage") == self.stage and context.node_config["partition-id"] in self.pids:
            raise RuntimeError(f"injected dropout at stage {self.stage}")
        return client_app(msg, context)


def _step(tmp_path, name: str, secure: bool, client=None, **extra) -> tuple[np.ndarray, pd.Series]:
    """G of round 1 (flattened, float64) and the round's row."""
    out = run_inprocess(STEP | {"secure-aggregation": secure, "out-dir": str(tmp_path / name)} | extra, num_clients=4,
                        client_app=client)
    cfg = RunConfig.from_mapping(STEP | {"model": "auto"})
    w = WORKLOADS[cfg.dataset]
    w0 = build_model(resolve_model(cfg.dataset, cfg.model), w.input_shape, w.num_classes, cfg.seed).state_dict()
    w1 = torch.load(out / "model.pt")
    grad = np.concatenate([(w0[k].double() - w1[k].double()).flatten().numpy() for k in w0])
    rounds = pd.read_csv(out / "rounds.csv")
    return grad, rounds[rounds["round"] == 1].iloc[0]


def _bound(batches: list[int], dim: int) -> float:
    return quantisation_bound(secagg_params(RunConfig.from_mapping(STEP), batches), dim, sum(batches))


def test_secure_step_equals_the_plain_weighted_mean_within_the_quantisation_bound(tmp_path):
    plain, row_p = _step(tmp_path, "plain", False)
    secure, row_s = _step(tmp_path, "secure", True)
    err, bound = np.linalg.norm(secure - plain), _bound([16] * 4, plain.size)
    print(f"secure vs plain: |dG| = {err:.3g}, bound {bound:.3g}, relative {err / np.linalg.norm(plain):.3g}")
    assert 0 < err <= 2 * bound  # quantised (not the plain path), and within the bound
    assert err / np.linalg.norm(plain) < 1e-4
    assert row_s["secure"] == 1 and row_s["global_batch"] == 64 and row_s["clients"] == 4
    assert row_s["train_loss"] == pytest.approx(row_p["train_loss"], rel=1e-5)
    # the noise statistics from sums (S = sum b_i |g_i|^2) equal the per-client ones
    for key in ("tr_sigma", "grad_sq", "b_simple", "grad_norm"):
        assert row_s[key] == pytest.approx(row_p[key], rel=1e-3), key


def test_a_client_dropped_in_a_secure_round_gives_the_plain_step_over_the_survivors(tmp_path):
    extra = {"min-batch-fraction": 0.75}
    plain, _ = _step(tmp_path, "plain", False, FaultyClientApp(client_app, lambda r, p: Fault("crash") if p == 3 else None),
                     **extra)
    secure, row = _step(tmp_path, "secure", True, StageDrop({3}, "collect_masked_vectors"), **extra)
    assert row["global_batch"] == 48 and row["clients"] == 3 and row["failed_clients"] == 1
    assert 0 < np.linalg.norm(secure - plain) <= 2 * _bound([16] * 3, plain.size)
    failures = pd.read_csv(tmp_path / "secure" / "failures.csv")
    assert list(failures["partition_id"]) == [3] and "collect masked vectors" in failures["reason"].iloc[0]


def test_a_client_lost_after_sending_its_masked_vector_stays_in_the_sum(tmp_path):
    plain, _ = _step(tmp_path, "plain", False)
    secure, row = _step(tmp_path, "secure", True, StageDrop({3}, "unmask"))
    assert row["global_batch"] == 64 and row["clients"] == 4  # its mask seed is rebuilt from the others' shares
    assert 0 < np.linalg.norm(secure - plain) <= 2 * _bound([16] * 4, plain.size)


def test_fewer_survivors_than_the_threshold_fail_the_round_naming_it(tmp_path):
    with pytest.raises(RoundFailure, match=r"2 of 4 sampled clients left, fewer than secagg-threshold t = 3"):
        _step(tmp_path, "secure", True, StageDrop({2, 3}, "collect_masked_vectors"),
              **{"min-batch-fraction": 0.25, "max-failed-rounds": 0})


@pytest.mark.parametrize("overrides, clients, message", [
    ({"teacher": "noise"}, 4, "teacher = 'noise': this teacher reads per-client"),
    ({"aggregator": "median"}, 4, "aggregator = 'median'"),
    ({"virtual-clients": 8}, 4, "virtual-clients = 8"),
    ({"clients-per-round": 2}, 2, r"SecAgg\+ needs at least 3 clients"),
    ({"secagg-threshold": 4}, 4, r"t = 4\): SecAgg\+ needs at least 3 clients and 2 <= t < K"),
])
def test_secure_aggregation_refuses_what_it_cannot_do(overrides, clients, message):
    cfg = RunConfig.from_mapping(STEP | {"secure-aggregation": True} | overrides)
    with pytest.raises(ConfigError, match=message):
        check_secure(cfg, clients, 0)
    with pytest.raises(ConfigError, match="BatchNorm"):
        check_secure(RunConfig.from_mapping(STEP | {"secure-aggregation": True}), 4, 2)
    with pytest.raises(ConfigError, match="secagg-threshold"):
        RunConfig.from_mapping(STEP | {"secagg-threshold": 1})


def test_preflight_refuses_before_any_round(tmp_path):
    with pytest.raises(ConfigError, match="clients-per-round"):
        run_inprocess(STEP | {"secure-aggregation": True, "out-dir": str(tmp_path / "r")}, num_clients=2)
    assert not (tmp_path / "r" / "rounds.csv").exists()


def test_the_vector_reads_back_and_its_canary_catches_a_bad_unmasking():
    grads = [torch.tensor([[3.0, 4.0]]), torch.tensor([0.0])]  # |g| = 5
    vec = secure_vector(grads, loss=2.0, clip_norm=2.5)  # clipped to norm 2.5
    mean = read_secure_mean(vec, [(1, 2), (1,)], clip_norm=2.5)
    assert mean.grads[0].tolist() == [[1.5, 2.0]] and mean.mean_sq == pytest.approx(6.25)
    assert mean.loss == pytest.approx(2.0) and mean.clipped == 1.0
    assert max(float(np.abs(a).max()) for a in vec) <= 2.5  # inside the quantiser's range [-C, C]
    vec[-1][2] += 0.01
    assert "canary" in read_secure_mean(vec, [(1, 2), (1,)], clip_norm=2.5)
    assert "shape" in read_secure_mean(vec, [(2, 1), (1,)], clip_norm=2.5)


def test_masks_depend_on_the_whole_seed():
    """Flower's generator folds a seed to 32 bits: two seeds with equal folds give the same mask. Ours does not."""
    flower = importlib.import_module("flwr.common.secure_aggregation.secaggplus_utils").pseudo_rand_gen
    a = hashlib.sha256(b"a").digest()
    b = bytes(x ^ y for x, y in zip(a, bytes(4) * 6 + b"\x01\x02\x03\x04" * 2))  # same XOR-fold of 4-byte words
    dims = [(3, 5), ()]
    assert all((x == y).all() for x, y in zip(flower(a, 2**32, dims), flower(b, 2**32, dims)))
    ours_a, ours_b = shake_mask(a, 2**32, dims), shake_mask(b, 2**32, dims)
    assert not (ours_a[0] == ours_b[0]).all()
    assert [x.shape for x in ours_a] == [(3, 5), ()] and all(x.dtype == np.int64 for x in ours_a)
    assert all(((x >= 0) & (x < 2**32)).all() for x in ours_a)
    assert (shake_mask(a, 2**32, dims)[0] == ours_a[0]).all()  # deterministic
    assert importlib.import_module(SERVER_WORKFLOW).pseudo_rand_gen is shake_mask  # installed by the strategy
    assert math.isclose(float(np.mean(shake_mask(a, 2**8, [(100_000,)])[0])), 127.5, rel_tol=0.01)


def test_client_side_clipping_bounds_each_client_and_is_reported(tmp_path):
    grad, row = _step(tmp_path, "clipped", True, **{"secagg-clip-norm": 0.05})
    assert row["clipped_share"] == 1.0  # every client clipped
    assert np.linalg.norm(grad) <= 0.05 * (1 + 1e-3)  # the mean of vectors of norm <= C


@pytest.mark.parametrize("teacher", ["adascale", "signed-noise"])
def test_teachers_that_read_only_sums_take_the_same_step_behind_secure_aggregation(tmp_path, teacher):
    extra = {"teacher": teacher, "teacher-small-batch": 8}
    plain, row_p = _step(tmp_path, "plain", False, **extra)
    secure, row_s = _step(tmp_path, "secure", True, **extra)
    assert row_s["lr"] == pytest.approx(row_p["lr"], rel=1e-3)  # the teacher's lr scale, from the same statistics
    assert row_s["tr_sigma"] == pytest.approx(row_p["tr_sigma"], rel=1e-3)
    print(f"{teacher}: |dw| = {np.linalg.norm(secure - plain):.3g}, |w1 - w0| = {np.linalg.norm(plain):.3g}")
    assert np.linalg.norm(secure - plain) <= 2 * row_p["lr"] * _bound([16] * 4, plain.size)


def test_a_client_with_flower_s_32_bit_masks_fails_the_canary_and_moves_nothing(tmp_path, monkeypatch):
    """The server expands masks with SHAKE-256; a client on Flower's generator cannot be unmasked."""
    from protocol.secure import CLIENT_MOD

    flower = importlib.import_module("flwr.common.secure_aggregation.secaggplus_utils").pseudo_rand_gen
    monkeypatch.setattr(importlib.import_module(CLIENT_MOD), "pseudo_rand_gen", flower)
    with pytest.raises(RoundFailure, match="failed its check .canary"):
        _step(tmp_path, "mismatch", True, **{"max-failed-rounds": 0})
