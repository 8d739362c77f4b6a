"""Faults are normal: bad replies, crashes, stragglers, divergence, and resuming after them.

Faults are injected around the unchanged ClientApp (experiments/faults.py) in the in-process
grid, or into hand-built replies of a small BatchNorm model handed to the strategy.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord

from client_app.app import app as client_app
from experiments.fault_tolerance import CASES, bad_reply_table
from experiments.faults import Fault, FaultyClientApp
from flb.inprocess import (
    FakeGrid,
    client_context,
    reply_via_client,
    run_inprocess,
    state_arrays,
)
from strategies.large_batch import DivergenceError, LargeBatchStrategy, RoundFailure
from strategies.reply_check import norm_outliers
from strategies.teacher_registry import build_teacher
from workloads.config import RunConfig
from workloads.models import build_model

BASE = {"num-server-rounds": 4, "eval-every": 2, "global-batch-size": 64}
EXPECTED_REASON = {
    "gradient with a NaN": "non-finite", "gradient with an Inf": "non-finite",
    "broadcastable wrong shape": "has shape (1, 8); expected (16, 8)", "extra tensor": "unexpected gradient tensors",
    "missing tensor": "gradient tensors missing", "integer gradient": "floating dtype is required",
    "num-examples = 0": "num-examples = 0; the server assigned 8",
    "num-examples = 10^9": "num-examples = 1000000000", "num-examples = 16 (8 assigned)": "num-examples = 16",
    "gradient x 1e6": "times the reference", "gradient x 1e3": "times the reference",
    "BatchNorm buffer NaN": "non-finite", "num_batches_tracked = 10^12": "expected between 0 and 8",
    "no compute-s metric": "metrics missing: compute-s", "train-loss NaN": "'train-loss' = nan",
    "the same node replies twice": "2 replies", "a node that was not sampled replies": "was not sampled",
    "client error (crash)": "injected crash", "no reply (hung past round-timeout-s)": "no reply within round-timeout-s",
}


def test_every_bad_reply_is_rejected_and_the_round_equals_the_round_without_it():
    table = bad_reply_table().set_index("case")
    assert list(table.index) == [name for name, _ in CASES]
    for case, row in table.iterrows():
        assert row["rejected"], case
        assert EXPECTED_REASON[case] in row["reason"], (case, row["reason"])
        assert row["model_finite"], case
        assert row["max_abs_diff_vs_round_without_it"] == 0.0, case


def test_norm_guard_needs_three_clients_and_flags_only_outliers():
    assert norm_outliers([1.0, 1e9], 10.0) == [False, False]  # which of two is wrong?
    assert norm_outliers([1.0, 1.2, 0.9, 12.5], 10.0) == [False, False, False, True]  # 12.5 > 10 x 1.2
    assert norm_outliers([1.0, 1.2, 0.9, 11.5], 10.0) == [False] * 4
    assert norm_outliers([0.01, 0.001, 3.0, 2.0], 10.0) == [False] * 4  # non-IID: far above the median, not the others
    assert norm_outliers([1.0, 1.2, 0.9, 1e6], 0.0) == [False] * 4  # off
    # late in training most clients have fit their examples: the recent rounds' norms are the reference
    assert norm_outliers([0.01, 0.02, 0.05, 3.0], 50.0) == [False, False, False, True]
    assert norm_outliers([0.01, 0.02, 0.05, 3.0], 50.0, recent_max=2.5) == [False] * 4


def _rounds(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "rounds.csv")


def _faulty(schedule):
    return FaultyClientApp(client_app, schedule)


def test_a_crashing_client_is_dropped_and_the_step_uses_the_examples_that_arrived(tmp_path):
    faulty = _faulty(lambda r, p: Fault("crash") if p == 3 else None)
    rounds = _rounds(run_inprocess(BASE | {"min-batch-fraction": 0.75, "out-dir": str(tmp_path)}, num_clients=4, client_app=faulty))
    done = rounds[rounds["round"] > 0]
    assert (done["planned_batch"] == 64).all() and (done["global_batch"] == 48).all()
    assert (done["failed_clients"] == 1).all() and done["samples_seen"].iloc[-1] == 4 * 48
    failures = pd.read_csv(tmp_path / "failures.csv")
    assert failures["partition_id"].tolist() == [3] * 4 and failures["round"].tolist() == [1, 2, 3, 4]
    assert failures["reason"].str.contains("injected crash").all()
    assert 3 not in set(pd.read_csv(tmp_path / "clients.csv")["partition_id"])
    assert all(bool(torch.isfinite(v).all()) for v in torch.load(tmp_path / "model.pt").values())


def test_the_strict_setting_stops_and_names_node_partition_and_reason(tmp_path):
    faulty = _faulty(lambda r, p: Fault("crash") if (r, p) == (2, 1) else None)
    with pytest.raises(RoundFailure, match=r"round 2: valid replies cover 48 of the 64.*partition 1\): client error: "
                                           r"RuntimeError: injected crash.*1 consecutive short rounds; max-failed-rounds = 0"):
        run_inprocess(BASE | {"out-dir": str(tmp_path), "round-retries": 0, "max-failed-rounds": 0}, num_clients=4,
                      client_app=faulty)
    assert pd.read_csv(tmp_path / "failures.csv")[["round", "partition_id"]].values.tolist() == [[2, 1]]


def _first_attempt_crashes(rounds: set[int], partitions: set[int]):
    """A schedule whose clients crash the first time they get a train message of ``rounds`` (retries succeed)."""
    seen: set[tuple[int, int]] = set()

    def schedule(rnd: int, pid: int) -> Fault | None:
        first = (rnd, pid) not in seen
        seen.add((rnd, pid))
        return Fault("crash") if first and rnd in rounds and pid in partitions else None

    return schedule


def test_a_short_round_retries_the_failed_clients_and_takes_the_planned_step(tmp_path):
    clean = run_inprocess(BASE | {"out-dir": str(tmp_path / "clean")}, num_clients=4)
    faulty = _faulty(_first_attempt_crashes({2, 3}, {0, 1, 2}))  # 3 of 4 clients crash once in rounds 2 and 3
    retried = run_inprocess(BASE | {"out-dir": str(tmp_path / "retried")}, num_clients=4, client_app=faulty)
    a, b = torch.load(clean / "model.pt"), torch.load(retried / "model.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0  # the planned step, bit for bit
    failures = pd.read_csv(retried / "failures.csv")
    assert failures[["round", "partition_id"]].values.tolist() == [[2, 0], [2, 1], [2, 2], [3, 0], [3, 1], [3, 2]]
    assert failures["reason"].str.endswith("(attempt 1; retried)").all()
    assert (_rounds(retried)["failed_clients"].fillna(0) == 0).all()


def test_short_rounds_are_skipped_up_to_max_failed_rounds_and_a_resume_skips_them_too(tmp_path):
    always = _faulty(lambda r, p: Fault("crash") if r in (2, 3) and p > 0 else None)
    config = BASE | {"num-server-rounds": 5, "checkpoint-every": 1, "round-retries": 1, "max-failed-rounds": 2}
    rounds = _rounds(run_inprocess(config | {"out-dir": str(tmp_path / "a")}, num_clients=4, client_app=always))
    assert rounds["skipped"].tolist()[1:] == [0, 1, 1, 0, 0] and rounds["global_batch"].tolist()[1:] == [64, 0, 0, 64, 64]
    assert rounds["samples_seen"].tolist()[1:] == [64, 64, 64, 128, 192]
    assert (rounds["virtual_s"].iloc[1:] > 0).all()  # a skipped round still took its time (the client that replied)
    # resumed from the checkpoint of the skipped round 2: the same model, bit for bit
    head = _faulty(lambda r, p: Fault("crash") if r >= 2 and p > 0 else None)
    with pytest.raises(RoundFailure, match="3 consecutive short rounds; max-failed-rounds = 2"):
        run_inprocess(config | {"out-dir": str(tmp_path / "b")}, num_clients=4, client_app=head)
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt")
    assert (ckpt["round"], ckpt["strategy"]["failed_rounds"]) == (3, 2)
    run_inprocess(config | {"out-dir": str(tmp_path / "b"), "resume": True}, num_clients=4)
    a, b = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_a_nan_gradient_never_reaches_the_model(tmp_path):
    faulty = _faulty(lambda r, p: Fault("nan") if p == 2 else None)
    run_inprocess(BASE | {"min-batch-fraction": 0.7, "out-dir": str(tmp_path)}, num_clients=4, client_app=faulty)
    assert pd.read_csv(tmp_path / "failures.csv")["reason"].str.contains("non-finite").all()
    assert all(bool(torch.isfinite(v).all()) for v in torch.load(tmp_path / "model.pt").values())


def test_a_hung_client_ends_its_round_at_the_timeout(tmp_path):
    faulty = _faulty(lambda r, p: Fault("hang", 60.0) if (r, p) == (2, 1) else None)
    # 5 s: round 1 includes each client's cold start (data, model, memory estimator)
    rounds = _rounds(run_inprocess(BASE | {"num-server-rounds": 3, "round-timeout-s": 5.0, "min-batch-fraction": 0.7,
                                           "out-dir": str(tmp_path)}, num_clients=4, client_app=faulty))
    trip = rounds.set_index("round")["round_trip_s"]
    assert 5.0 <= trip[2] <= 5.0 + 2.0, trip.tolist()
    assert trip[3] < 1.0  # the next round does not wait for it
    reason = pd.read_csv(tmp_path / "failures.csv")["reason"].tolist()
    assert reason == ["no reply within round-timeout-s = 5 s"]


def test_a_divergent_step_is_undone_and_the_last_checkpoint_kept(tmp_path):
    config = BASE | {"teacher": "step", "teacher-steps": "0:1,2:1e39", "checkpoint-every": 1, "out-dir": str(tmp_path)}
    with pytest.raises(DivergenceError, match=r"round 3: the server step would make the global model non-finite"):
        run_inprocess(config, num_clients=4)
    ckpt = torch.load(tmp_path / "checkpoint.pt")
    assert ckpt["round"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["strategy"]["model"].values())
    assert pd.read_csv(tmp_path / "rounds.csv")["round"].tolist() == [0, 1, 2]


def test_resume_after_a_failed_round_ends_with_the_uninterrupted_model(tmp_path):
    config = BASE | {"num-server-rounds": 8, "checkpoint-every": 2, "teacher": "adascale", "clients-per-round": 3,
                     "global-batch-size": 90, "eval-every": 4, "max-failed-rounds": 0}
    run_inprocess(config | {"out-dir": str(tmp_path / "a")}, num_clients=4)
    faulty = _faulty(lambda r, p: Fault("crash") if r == 7 else None)
    with pytest.raises(RoundFailure):
        run_inprocess(config | {"out-dir": str(tmp_path / "b")}, num_clients=4, client_app=faulty)
    assert torch.load(tmp_path / "b" / "checkpoint.pt")["round"] == 6
    stale = tmp_path / "b" / ".clients.csv.x1y2z3.tmp"  # what a SIGKILL in the middle of a write leaves
    stale.write_text("round,node_id\n7,")
    run_inprocess(config | {"out-dir": str(tmp_path / "b"), "resume": True}, num_clients=4)
    assert not stale.exists()
    a, b = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    ra, rb = pd.read_csv(tmp_path / "a" / "rounds.csv"), pd.read_csv(tmp_path / "b" / "rounds.csv")
    assert rb["round"].tolist() == list(range(9))
    assert ra["train_loss"].iloc[1:].tolist() == rb["train_loss"].iloc[1:].tolist()
    assert pd.read_csv(tmp_path / "b" / "failures.csv").empty  # round 7's failure was undone with it


def test_resume_refuses_a_changed_config(tmp_path):
    run_inprocess(BASE | {"num-server-rounds": 2, "out-dir": str(tmp_path)}, num_clients=2)
    with pytest.raises(Exception, match=r"run-config key 'lr' = 0.5, but the checkpoint .* was written with 0.3"):
        run_inprocess(BASE | {"num-server-rounds": 2, "out-dir": str(tmp_path), "resume": True, "lr": 0.5}, num_clients=2)


def test_assignment_depends_on_partitions_not_on_node_ids():
    """The same config on two deployments with different random node ids gives the same round, bit for bit."""
    run_config = {"global-batch-size": 23, "clients-per-round": 2}
    states, batches = [], []
    for node_ids in ([5, 6, 7], [900, 17, 3]):
        cfg = RunConfig.from_mapping(run_config)
        model = build_model("mlp", (1, 8, 8), 10, cfg.seed)
        strategy = LargeBatchStrategy(cfg, model.state_dict(), [n for n, _ in model.named_parameters()], build_teacher(cfg))
        grid = FakeGrid(node_ids)
        msgs = list(strategy.configure_train(1, state_arrays(strategy.state), ConfigRecord(), grid))
        batches.append(sorted(strategy.assigned.values()))
        replies = [reply_via_client(client_app, m, client_context(m.metadata.dst_node_id,
                                                                  node_ids.index(m.metadata.dst_node_id), 3, run_config))
                   for m in reversed(msgs)]  # arrival order must not matter either
        strategy.aggregate_train(1, replies)
        states.append(strategy.state)
    assert batches[0] == batches[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_round_every_client_refuses_with_a_config_error_stops_at_once(tmp_path):
    """A client's ConfigError is its settings: it is not retried, and no round can be skipped past it."""
    from workloads.errors import ConfigError

    def refusing(msg, context):
        if msg.metadata.message_type == "train":
            raise ConfigError("node-config key 'memory-budget-mb' = 1: too small for one example")
        return client_app(msg, context)

    with pytest.raises(RoundFailure, match=r"round 1: .*too small for one example.*Every client refused the round "
                                           "with a ConfigError"):
        run_inprocess(BASE | {"out-dir": str(tmp_path)}, num_clients=2, client_app=refusing)
    assert len(pd.read_csv(tmp_path / "failures.csv")) == 2  # one attempt each: no retry
