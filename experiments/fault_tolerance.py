"""Faults, measured: bad replies, honest gradient-norm spreads, and random client dropouts.

``python -m experiments.fault_tolerance [--part table|norms|dropouts|all] [--seeds 3] [--quick]``

1. **Bad replies** (``table``). One round of 4 clients on a small model with BatchNorm, once
   with one client's reply corrupted (experiments/faults.py) and once without that client.
   For each case: was the reply rejected, with which reason, is the global model finite, and
   the largest absolute difference between the two global models (0 = the bad client had no
   effect at all).
2. **Honest norm spreads** (``norms``). The largest ``|g_i| / median_j |g_j|`` over the rounds
   of honest runs (digits MLP and MNIST CNN, 8 clients, IID and Dirichlet alpha = 0.1, the
   norm guard off): the default ``max-norm-ratio`` must sit well above it.
3. **Stragglers** (``straggler``). One client hangs in round 2; the round's duration
   (``round_trip_s``) against ``round-timeout-s``.
4. **Dropouts** (``dropouts``). Digits, 8 clients, default config with ``min-batch-fraction =
   0.7``: every client crashes independently with probability 0, 0.2 or 0.4 in every round (each
   retry is another draw); seeds 1..S; completed runs, skipped rounds and final test accuracy.

Writes ``<out>/fault_tolerance_*.csv`` and prints the tables.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from torch import nn

from experiments.faults import Fault, FaultyClientApp, corrupt, independent_dropouts
from flb.inprocess import InProcessGrid, delivered, run_inprocess, set_task_identity
from strategies.large_batch import LargeBatchStrategy
from strategies.reply_check import NORM_WINDOW
from strategies.teacher_registry import build_teacher
from workloads.config import RunConfig
from workloads.files import atomic_write_text

CASES: list[tuple[str, object]] = [
    ("gradient with a NaN", Fault("nan")), ("gradient with an Inf", Fault("inf")),
    ("broadcastable wrong shape", Fault("broadcast")), ("extra tensor", Fault("extra")),
    ("missing tensor", Fault("missing")), ("integer gradient", Fault("int-grad")),
    ("num-examples = 0", Fault("lie", 0)), ("num-examples = 10^9", Fault("lie", 1e9)),
    ("num-examples = 16 (8 assigned)", Fault("lie", 16)), ("gradient x 1e6", Fault("scale", 1e6)),
    ("gradient x 1e3", Fault("scale", 1e3)), ("BatchNorm buffer NaN", Fault("buffer-nan")),
    ("num_batches_tracked = 10^12", Fault("counter", 1e12)), ("no compute-s metric", Fault("no-metric")),
    ("train-loss NaN", Fault("nan-metric")), ("the same node replies twice", "duplicate"),
    ("a node that was not sampled replies", "stranger"), ("client error (crash)", "error"),
    ("no reply (hung past round-timeout-s)", "silent"),
]


def _bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _client_reply(msg: Message, pid: int, state: dict) -> Message:
    """What an honest client would send: the gradient of its batch, its BatchNorm buffers, its metrics."""
    model = _bn_model()
    model.load_state_dict(state)
    b = int(msg.content["config"]["local-batch-size"])
    gen = torch.Generator().manual_seed(100 + pid)
    x, y = torch.randn(b, 8, generator=gen), torch.randint(0, 4, (b,), generator=gen)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    content = RecordDict({
        "grads": ArrayRecord({n: p.grad.detach().clone() for n, p in model.named_parameters()}),
        "buffers": ArrayRecord({n: v.detach().clone() for n, v in model.named_buffers()}),
        "metrics": MetricRecord({"num-examples": b, "train-loss": float(loss.detach()), "compute-s": 0.01, "peak-mem-mb": float("nan"),
                                 "predicted-peak-mb": 1.0, "budget-mb": 0.0, "max-batch": 0, "micro-batch-size": b,
                                 "partition-id": pid}),
    })
    return Message(content, reply_to=delivered(msg))


def _one_round(cfg: RunConfig, replies_of) -> tuple[LargeBatchStrategy, list[dict]]:
    """Configure round 1 for 4 nodes, hand ``replies_of(messages, honest replies)`` to aggregate_train."""
    model = _bn_model()
    strategy = LargeBatchStrategy(cfg, model.state_dict(), [n for n, _ in model.named_parameters()], build_teacher(cfg))
    from client_app.app import app

    grid = InProcessGrid(app, 4, cfg.to_mapping())
    msgs = list(strategy.configure_train(1, ArrayRecord(strategy.state), ConfigRecord(), grid))
    state = {k: v.clone() for k, v in strategy.state.items()}
    honest = [_client_reply(m, strategy.assigned[m.metadata.dst_node_id][0], state) for m in msgs]
    try:
        strategy.aggregate_train(1, replies_of(msgs, honest))
    except Exception as err:  # noqa: BLE001 - reported in the table
        return strategy, [{"error": f"{type(err).__name__}: {err}"}]
    return strategy, strategy.sink.failure_rows


def bad_reply_table() -> pd.DataFrame:
    """Each bad-reply case against the same round without the bad client (see the module docstring).

    The run config is the default but for B = 32 over 4 clients, lr 0.5 without warm-up and
    ``min-batch-fraction`` 0.7 (so a round without one client proceeds).
    """
    set_task_identity()
    cfg = RunConfig(global_batch_size=32, lr=0.5, warmup_rounds=0, min_batch_fraction=0.7)
    ref, _ = _one_round(cfg, lambda msgs, honest: honest[1:])  # client 0 left out
    rows = []
    for name, fault in CASES:
        def replies_of(msgs, honest, fault=fault):
            bad = honest[0]
            if fault == "duplicate":
                return [bad, bad, *honest[1:]]
            if fault == "stranger":
                return [Message(bad.content, metadata=_with_src(bad.metadata, 424242)), *honest[1:]]
            if fault == "error":
                return [Message(Error(code=2, reason="injected crash"), reply_to=delivered(msgs[0])), *honest[1:]]
            if fault == "silent":
                return honest[1:]
            return [corrupt(bad, fault), *honest[1:]]

        strategy, failures = _one_round(cfg, replies_of)
        diff = max(float((strategy.state[k].double() - ref.state[k].double()).abs().max()) for k in ref.state)
        finite = all(bool(torch.isfinite(v.double()).all()) for v in strategy.state.values())
        reasons = [f.get("reason", f.get("error", "")) for f in failures]
        rows.append({"case": name, "rejected": bool(reasons), "reason": " | ".join(reasons),
                     "model_finite": finite, "max_abs_diff_vs_round_without_it": diff})
    return pd.DataFrame(rows)


def _with_src(md: Metadata, src: int) -> Metadata:
    return Metadata(run_id=md.run_id, message_id=md.message_id, src_node_id=src, dst_node_id=md.dst_node_id,
                    reply_to_message_id=md.reply_to_message_id, group_id=md.group_id, created_at=md.created_at,
                    ttl=md.ttl, message_type=md.message_type)


def norm_spreads(rounds: int, data_dir: str, seeds: int) -> pd.DataFrame:
    """Honest spreads of client gradient norms per setting (norm guard off).

    Three ratios per round, maximised over the rounds: the largest norm over the median, over
    the second largest, and over the guard's reference (the larger of the second largest and
    the largest norm of the previous ``NORM_WINDOW`` rounds, ``strategies.reply_check``).
    """
    small = int(np.ceil(10 * 1294 / 32))  # 10 epochs of digits at B = 32 (b_i = 4 with 8 clients)
    settings = [("digits", "mlp", "iid", 0.5, k, 256, rounds, seed) for k in (3, 8) for seed in range(1, seeds + 1)]
    settings += [("digits", "mlp", "dirichlet", 0.1, k, 10 * k, rounds, seed) for k in (3, 8) for seed in range(1, seeds + 1)]
    settings += [("digits", "mlp", p, a, 8, 32, small, seed) for p, a in (("iid", 0.5), ("dirichlet", 0.1))
                 for seed in range(1, seeds + 1)]
    if data_dir:
        settings += [("mnist", "cnn", p, a, 8, 256 if p == "iid" else 80, rounds, 1) for p, a in (("iid", 0.5), ("dirichlet", 0.1))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, model, partitioner, alpha, k, batch, n_rounds, seed in settings:
            out = Path(tmp) / f"{dataset}-{partitioner}-{k}-{batch}-{seed}"
            config = {"dataset": dataset, "model": model, "partitioner": partitioner, "dirichlet-alpha": alpha,
                      "num-server-rounds": n_rounds, "eval-every": n_rounds, "max-norm-ratio": 0.0, "out-dir": str(out),
                      "data-dir": data_dir if dataset != "digits" else "", "train-limit": 10000 if dataset == "mnist" else 0,
                      "global-batch-size": batch, "seed": seed, "lr": 0.3 if dataset == "digits" else 0.05}
            run_inprocess(config, num_clients=k)
            norms = pd.read_csv(out / "clients.csv").groupby("round")["grad_norm"]
            top = norms.max()
            second = norms.apply(lambda g: float(g.nlargest(2).iloc[-1]))
            recent = top.shift(1).rolling(NORM_WINDOW, min_periods=1).max().fillna(0.0)
            rows.append({"dataset": dataset, "partitioner": partitioner, "alpha": alpha if partitioner == "dirichlet" else "",
                         "clients": k, "local_batch": batch // k, "seed": seed, "rounds": n_rounds,
                         "max_over_median": float((top / norms.median()).max()), "max_over_second": float((top / second).max()),
                         "max_over_guard_reference": float((top / np.maximum(second, recent)).max())})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


DROPOUT_RATES = (0.0, 0.2, 0.4)


def dropouts(seeds: int, rounds: int, rates: tuple[float, ...] = DROPOUT_RATES) -> pd.DataFrame:
    """Each client crashes with probability p in every round (each retry another draw); digits, 8 clients."""
    from client_app.app import app

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, seeds + 1):
            for rate in rates:
                out = Path(tmp) / f"s{seed}-{rate:g}"
                config = {"seed": seed, "num-server-rounds": rounds, "eval-every": rounds, "out-dir": str(out),
                          "min-batch-fraction": 0.7}
                wrapper = FaultyClientApp(app, independent_dropouts(rate, seed)) if rate else None
                df = pd.read_csv(run_inprocess(config, num_clients=8, client_app=wrapper) / "rounds.csv")
                last, done = df.iloc[-1], df[df["round"] > 0]
                rows.append({"seed": seed, "dropout": rate, "rounds_completed": int(last["round"]),
                             "crashes": len(wrapper.injected) if wrapper else 0,
                             "failed_client_rounds": int(done["failed_clients"].fillna(0).sum()),
                             "skipped_rounds": int(done["skipped"].sum()),
                             "mean_global_batch": float(done["global_batch"].mean()),
                             "test_accuracy": float(last["test_accuracy"])})
                print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def dropout_summary(drops: pd.DataFrame, rounds: int) -> str:
    """Mean +- std per dropout rate, and each rate's difference to the fault-free runs."""
    summary = drops.groupby("dropout").agg(
        test_accuracy=("test_accuracy", "mean"), std=("test_accuracy", "std"), runs=("seed", "count"),
        completed=("rounds_completed", lambda r: int((r == rounds).sum())), skipped=("skipped_rounds", "sum"),
        mean_global_batch=("mean_global_batch", "mean"))
    clean = summary.loc[0.0, "test_accuracy"]
    summary["diff_pp"] = 100 * (summary["test_accuracy"] - clean)
    return summary.to_string(float_format=lambda v: f"{v:.4f}")


def straggler(timeouts: tuple[float, ...]) -> pd.DataFrame:
    """How long a round with one hung client (asleep for 10 minutes) takes, per ``round-timeout-s``."""
    from client_app.app import app

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for timeout in timeouts:
            hung = FaultyClientApp(app, lambda r, p: Fault("hang", 600.0) if (r, p) == (2, 1) else None)
            df = pd.read_csv(run_inprocess({"num-server-rounds": 3, "eval-every": 3, "round-timeout-s": timeout,
                                            "min-batch-fraction": 0.7, "out-dir": str(Path(tmp) / f"t{timeout:g}")},
                                           num_clients=4, client_app=hung) / "rounds.csv").set_index("round")
            rows.append({"round_timeout_s": timeout, "hung_round_s": float(df.loc[2, "round_trip_s"]),
                         "over_timeout_s": float(df.loc[2, "round_trip_s"]) - timeout,
                         "clean_round_s": float(df.loc[3, "round_trip_s"]), "failed_clients": int(df.loc[2, "failed_clients"])})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen parts and write their CSVs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("table", "norms", "dropouts", "straggler", "all"), default="all")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--data-dir", default=os.environ.get("FLB_DATA_DIR", ""))
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--quick", action="store_true", help="1 seed, 10 rounds (for the test suite)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds, args.data_dir = 1, 10, ""
    out = Path(args.out)
    suffix = "_quick" if args.quick else ""
    pd.set_option("display.width", 200)
    pd.set_option("display.max_colwidth", 90)
    if args.part in ("table", "all"):
        table = bad_reply_table()
        atomic_write_text(out / f"fault_tolerance_replies{suffix}.csv", table.to_csv(index=False))
        print(table.to_string(index=False))
    if args.part in ("norms", "all"):
        norms = norm_spreads(args.rounds, args.data_dir, args.seeds)
        atomic_write_text(out / f"fault_tolerance_norms{suffix}.csv", norms.to_csv(index=False))
        print(norms.to_string(index=False))
    if args.part in ("straggler", "all"):
        slow = straggler((5.0, 20.0))
        atomic_write_text(out / f"fault_tolerance_straggler{suffix}.csv", slow.to_csv(index=False))
        print(slow.to_string(index=False))
    if args.part in ("dropouts", "all"):
        drops = dropouts(args.seeds, args.rounds)
        atomic_write_text(out / f"fault_tolerance_dropouts{suffix}.csv", drops.to_csv(index=False))
        print(drops.to_string(index=False))
        print(dropout_summary(drops, args.rounds))


if __name__ == "__main__":
    main()
