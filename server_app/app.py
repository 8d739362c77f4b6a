"""ServerApp: parse the config once, run the strategy, evaluate centrally, write results and checkpoints."""

from __future__ import annotations

import logging
import time
from logging import INFO

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server_app.grid import PackedGrid, RoundGrid
from server_app.preflight import parse_run_config
from server_app.results import RunResults, resolve_out_dir
from strategies.large_batch import LargeBatchStrategy
from strategies.secure_round import SecureLargeBatchStrategy
from strategies.tail_average import delivered_model
from strategies.privacy import dp_on, privacy_summary
from strategies.teacher_registry import build_teacher
from workloads.config import RunConfig
from workloads.data import load_splits
from workloads.models import build_model
from workloads.registry import WORKLOADS, resolve_model
from workloads.training import evaluate, pick_device

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` large-global-batch steps (or the rest of them, on resume)."""
    cfg = parse_run_config(context.run_config)
    workload = WORKLOADS[cfg.dataset]
    model_name = resolve_model(cfg.dataset, cfg.model)
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.train_limit)
    device = pick_device(cfg.device)
    model = build_model(model_name, workload.input_shape, workload.num_classes, cfg.seed).to(device)
    loss_fn = workload.loss()
    out = resolve_out_dir(cfg.out_dir, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    results = RunResults(out, cfg, extra={"model": model_name, "parameters": n_params})
    kind = SecureLargeBatchStrategy if cfg.secure_aggregation else LargeBatchStrategy
    strategy = kind(cfg, model.state_dict(), [name for name, _ in model.named_parameters()],
                                  build_teacher(cfg), sink=results)
    done, wall0 = _resume(cfg, results, strategy) if cfg.resume else (0, 0.0)
    log(INFO, "flower-large-batch: %s / %s (%.3g M params), %d train / %d val / %d test examples, "
        "results in %s", cfg.dataset, model_name, n_params / 1e6, len(splits.y_train),
        len(splits.y_val), len(splits.y_test), out)

    inputs = lambda x: splits.inputs(x, device)  # noqa: E731
    t_start = time.perf_counter()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd = server_round + done
        if server_round == 0 and done > 0:
            return None  # the resumed model was evaluated and recorded before the interruption
        evaluation = {}
        last = rnd == cfg.num_server_rounds
        if rnd % cfg.eval_every == 0 or last:
            evaluation = _evaluation(model, arrays.to_torch_state_dict(), strategy.server_state.average, loss_fn,
                                     inputs, splits)
        row = results.finish_round(rnd, evaluation, wall0 + time.perf_counter() - t_start)
        if rnd > 0 and (last or (cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0)):
            results.save_checkpoint(strategy.server_state, row["wall_s"])
        log(INFO, "[round %d/%d] B=%d%s lr=%.4g train_loss=%s val_acc=%s test_acc=%s wall=%.1fs",
            rnd, cfg.num_server_rounds, row["global_batch"],
            f" ({row['failed_clients']} failed)" if row.get("failed_clients") else "", row["lr"],
            _f(row.get("train_loss")), _f(row.get("val_accuracy")), _f(row.get("test_accuracy")), row["wall_s"])
        return MetricRecord({k: float(v) for k, v in row.items() if k.endswith(("loss", "accuracy"))})

    if done < cfg.num_server_rounds:
        chatter = FlowerStrategyChatter()
        logging.getLogger("flwr").addFilter(chatter)
        try:
            round_grid = RoundGrid(grid)
            packed = PackedGrid(round_grid, cfg.virtual_clients) if cfg.virtual_clients else round_grid
            strategy.start(grid=packed, initial_arrays=ArrayRecord(strategy.state),
                           num_rounds=cfg.num_server_rounds - done, timeout=cfg.round_timeout_s, evaluate_fn=evaluate_fn)
        finally:
            logging.getLogger("flwr").removeFilter(chatter)
            results.flush()  # rows committed since the last write, also when a round failed
    path = results.save_model(delivered_model(strategy.server_state))
    log(INFO, "final model: %s", path)
    if dp_on(cfg):
        privacy = privacy_summary(cfg, strategy.server_state.dp_history)
        results.privacy(privacy)
        log(INFO, "client-level DP: epsilon = %s at delta = %g after %d rounds (z = %s, accountant %s)",
            privacy["dp_epsilon"], cfg.dp_delta, privacy["rounds"], privacy["dp_noise_multiplier"], cfg.dp_accountant)


def _evaluation(model, weights, average, loss_fn, inputs, splits) -> dict[str, float]:
    """The round's scores: of the global model ``weights``, or with ``average-from`` of the tail mean
    ``average`` (the run's model) and, as ``last_*_accuracy``, of the global model."""
    if average is None:
        return _scores(model, weights, loss_fn, inputs, splits)
    last = _scores(model, weights, loss_fn, inputs, splits)
    return {f"last_{k}": v for k, v in last.items() if k.endswith("accuracy")} | _scores(
        model, average, loss_fn, inputs, splits)


def _scores(model, weights, loss_fn, inputs, splits) -> dict[str, float]:
    """Validation and test loss and accuracy of ``model`` with ``weights`` (a state_dict) loaded."""
    model.load_state_dict(weights)
    val_loss, val_accuracy = evaluate(model, loss_fn, inputs, splits.x_val, splits.y_val)
    test_loss, test_accuracy = evaluate(model, loss_fn, inputs, splits.x_test, splits.y_test)
    return {"val_loss": val_loss, "val_accuracy": val_accuracy, "test_loss": test_loss, "test_accuracy": test_accuracy}


def _resume(cfg: RunConfig, results: RunResults, strategy: LargeBatchStrategy) -> tuple[int, float]:
    """Load the checkpoint's ServerState into the strategy; (rounds done, wall seconds so far)."""
    ckpt = results.load_checkpoint()
    done, wall0 = 0, 0.0
    if ckpt is not None:
        strategy.server_state, wall0 = ckpt
        done = strategy.server_state.round
    results.keep_through(done if ckpt is not None else -1)
    log(INFO, "resuming %s after round %d of %d", results.out_dir, done, cfg.num_server_rounds)
    return done, wall0


class FlowerStrategyChatter(logging.Filter):
    """Drops the log lines of Flower's ``Strategy.start`` (6 a round, about 190 after the last) and SecAgg+'s.

    Our own line per round (above) says what matters; warnings and errors always pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        path = record.pathname.replace("\\", "/")
        return record.levelno >= logging.WARNING or not ("serverapp/strategy" in path or "secure_aggregation" in path)


def _f(value: float | str | None) -> str:
    if value is None or value == "":
        return "-"
    return f"{float(value):.4f}"
