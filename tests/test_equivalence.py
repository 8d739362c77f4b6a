"""The federated round equals centralised SGD on the union of the clients' batches.

With local-steps=1, the identity teacher and a model without BatchNorm, one round (ClientApp
gradients -> strategy aggregation -> server SGD) must equal one ``torch.optim.SGD`` step on
the concatenation of the clients' batches, to 1e-5 relative (on the update, not on the
weights, which would hide the error).
"""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import ConfigRecord

from client_app.app import app as client_app
from client_app.job import get_job
from strategies.large_batch import LargeBatchStrategy
from strategies.server_opt import lr_at
from strategies.teacher_registry import build_teacher
from flb.inprocess import FakeGrid, client_context, reply_via_client, state_arrays
from workloads.config import RunConfig
from workloads.models import build_model
from workloads.registry import WORKLOADS

NODES = [101, 102, 103]


def _setup(run_config: dict):
    cfg = RunConfig.from_mapping(run_config)
    w = WORKLOADS[cfg.dataset]
    model = build_model("mlp", w.input_shape, w.num_classes, cfg.seed)
    names = [n for n, _ in model.named_parameters()]
    strategy = LargeBatchStrategy(cfg, model.state_dict(), names, build_teacher(cfg))
    contexts = {nid: client_context(nid, i, len(NODES), run_config) for i, nid in enumerate(NODES)}
    return cfg, model, strategy, contexts


def _federated_round(cfg, strategy, contexts, rnd):
    """Run one round; return the batches each client drew (replayed from its sampler state)."""
    msgs = list(strategy.configure_train(rnd, state_arrays(strategy.state), ConfigRecord(), FakeGrid(NODES)))
    replies, drawn = [], []
    for m in msgs:
        nid = m.metadata.dst_node_id
        ctx = contexts[nid]
        b, steps = int(m.content["config"]["local-batch-size"]), int(m.content["config"]["local-steps"])
        job = get_job(cfg, NODES.index(nid), len(NODES))
        drawn.append(job.draw(int(m.content["config"]["drawn-examples"]), b, steps))
        reply = reply_via_client(client_app, m, ctx)
        assert not reply.has_error(), reply.error
        replies.append(reply)
    strategy.aggregate_train(rnd, replies)
    assert all(not r.content.array_records and r.content.metric_records for r in replies)  # arrays freed once aggregated
    return drawn


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _flat(model_or_state) -> torch.Tensor:
    tensors = model_or_state.parameters() if hasattr(model_or_state, "parameters") else model_or_state
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@pytest.mark.parametrize("micro", [0, 3])
def test_rounds_equal_centralised_sgd(micro):
    run_config = {"global-batch-size": 23, "micro-batch-size": micro, "lr": 0.3, "momentum": 0.9,
                  "weight-decay": 5e-4, "warmup-rounds": 1, "schedule": "cosine", "num-server-rounds": 4}
    cfg, model, strategy, contexts = _setup(run_config)
    splits = get_job(cfg, 0, len(NODES)).splits
    central = copy.deepcopy(model)
    opt = torch.optim.SGD(central.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    for rnd in range(1, cfg.num_server_rounds + 1):
        before = _flat(central)
        drawn = _federated_round(cfg, strategy, contexts, rnd)
        assert sorted(len(d[0][1]) for d in drawn) == [7, 8, 8]  # B = 23 split over 3 clients
        x = torch.cat([d[0][0] for d in drawn])
        y = torch.cat([d[0][1] for d in drawn])
        for group in opt.param_groups:
            group["lr"] = lr_at(rnd, cfg.num_server_rounds, cfg.lr, cfg.warmup_rounds, cfg.schedule)
        opt.zero_grad()
        loss_fn(central(splits.inputs(x)), y).backward()
        opt.step()
        fed = _flat([strategy.state[n] for n, _ in central.named_parameters()])
        step_err = _rel_err(fed - before, _flat(central) - before)
        assert step_err < 1e-5, f"round {rnd}: federated step differs from SGD by {step_err:.2e}"
    assert strategy.server_state.samples_seen == 23 * cfg.num_server_rounds


def test_local_steps_equal_weighted_fedavg():
    """local-steps=H, no server momentum, server lr = client lr: the b_i-weighted mean of the
    clients' locally trained models (FedAvg)."""
    run_config = {"global-batch-size": 20, "local-steps": 3, "lr": 0.2, "momentum": 0.0,
                  "weight-decay": 0.0, "warmup-rounds": 0, "schedule": "constant", "num-server-rounds": 1}
    cfg, model, strategy, contexts = _setup(run_config)
    splits = get_job(cfg, 0, len(NODES)).splits
    start = _flat(model)
    drawn = _federated_round(cfg, strategy, contexts, 1)
    loss_fn = torch.nn.CrossEntropyLoss()
    finals, weights = [], []
    for batches in drawn:
        local = copy.deepcopy(model)
        opt = torch.optim.SGD(local.parameters(), lr=cfg.lr)
        for x, y in batches:
            opt.zero_grad()
            loss_fn(local(splits.inputs(x)), y).backward()
            opt.step()
        finals.append(_flat(local))
        weights.append(len(batches[0][1]))
    fedavg = sum(w * f for w, f in zip(weights, finals)) / sum(weights)
    fed = _flat([strategy.state[n] for n, _ in model.named_parameters()])
    err = _rel_err(fed - start, fedavg - start)
    assert err < 1e-5, f"local-steps=3 differs from weighted FedAvg by {err:.2e}"
    assert strategy.server_state.samples_seen == 20 * 3
