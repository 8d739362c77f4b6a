"""ServerApp: parse the config once, run the strategy, evaluate centrally, write results."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server_app.results import ResultsWriter, resolve_out_dir
from strategies.large_batch import LargeBatchStrategy
from strategies.teacher_registry import build_teacher
from workloads.config import RunConfig
from workloads.data import load_splits
from workloads.models import build_model
from workloads.registry import WORKLOADS, resolve_model
from workloads.training import evaluate, pick_device

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` large-global-batch steps and write the results folder."""
    cfg = RunConfig.from_mapping(context.run_config)
    workload = WORKLOADS[cfg.dataset]
    model_name = resolve_model(cfg.dataset, cfg.model)
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.train_limit)
    device = pick_device(cfg.device)
    model = build_model(model_name, workload.input_shape, workload.num_classes, cfg.seed).to(device)
    loss_fn = workload.loss()
    out = resolve_out_dir(cfg.out_dir, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    writer = ResultsWriter(out, cfg, extra={"model": model_name, "parameters": n_params})
    log(INFO, "flower-large-batch: %s / %s (%.3g M params), %d train / %d val / %d test examples, "
        "results in %s", cfg.dataset, model_name, n_params / 1e6, len(splits.y_train),
        len(splits.y_val), len(splits.y_test), out)

    strategy = LargeBatchStrategy(
        cfg,
        initial_state=model.state_dict(),
        param_names=[name for name, _ in model.named_parameters()],
        teacher=build_teacher(cfg),
    )
    inputs = lambda x: splits.inputs(x, device)  # noqa: E731
    t_start = time.perf_counter()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        row = {"round": server_round, "global_batch": 0, "samples_seen": 0, "lr": 0.0}
        if server_round > 0:
            row |= strategy.last_round
        last = server_round == cfg.num_server_rounds
        if server_round % cfg.eval_every == 0 or last:
            model.load_state_dict(arrays.to_torch_state_dict())
            row["val_loss"], row["val_accuracy"] = evaluate(model, loss_fn, inputs, splits.x_val, splits.y_val)
            row["test_loss"], row["test_accuracy"] = evaluate(model, loss_fn, inputs, splits.x_test, splits.y_test)
        row["wall_s"] = time.perf_counter() - t_start
        writer.add_round(row, strategy.client_rows)
        if strategy.batch_plan:
            writer.write_json("batch_plan.json", strategy.batch_plan)
        log(INFO, "[round %d/%d] B=%d lr=%.4g train_loss=%s val_acc=%s test_acc=%s wall=%.1fs",
            server_round, cfg.num_server_rounds, row["global_batch"], row["lr"],
            _f(row.get("train_loss")), _f(row.get("val_accuracy")), _f(row.get("test_accuracy")),
            row["wall_s"])
        return MetricRecord({k: float(v) for k, v in row.items() if k.endswith(("loss", "accuracy"))})

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(strategy.state),
        num_rounds=cfg.num_server_rounds,
        evaluate_fn=evaluate_fn,
    )
    path = writer.save_model(strategy.state)
    log(INFO, "final model: %s", path)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"

