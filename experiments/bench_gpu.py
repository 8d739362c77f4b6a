"""The Ray engine on a GPU against pure PyTorch: ``python -m experiments.bench_gpu``.

Default: ResNet-18 on CIFAR-10 (``FLB_DATA_DIR``), a global batch of 1,024 over 8 virtual
clients sharing one GPU (``client-resources-num-gpus=0.125``), 12 rounds, through the launcher
(``flwr run``); against one process doing the same step (the same 1,024 examples, one SGD step)
on the same GPU. Both measured in this run. ``--nodes 2`` packs the 8 clients onto 2 Flower
nodes (``virtual-clients``, each node 0.5 of the GPU): 2 messages a round instead of 8.

Reported per steady round (rounds 2..R-1, medians):

- ``round_s``: the server's round trip (messages out to the last reply);
- ``compute_s``: the slowest client's forward and backward (CUDA-synchronised, ``clients.csv``);
- ``serialize_s``: turning the model into an ``ArrayRecord`` and back, once per message each
  way (weights down, gradients up), measured here on the same model;
- ``server_s``: aggregation, teacher and optimizer on the server;
- ``other_s``: the rest: Ray's object transfers, Flower's message handling, scheduling.

The last line is ``sim_round_s=<x> torch_step_s=<y> ratio=<y/x> ...`` (the ratio is the
simulation's throughput over pure PyTorch's; the goal on a GPU is at least 0.7). Without a
GPU, ``--device cpu`` runs the same measurement on the CPU (for checking the script; give a
smaller ``--model``/``--batch``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from flb.launch.run import launch, prepare
from workloads.data import load_splits
from workloads.models import build_model
from workloads.registry import WORKLOADS
from workloads.training import pick_device, step_seconds


def serialize_seconds(model: torch.nn.Module, messages: int, repeats: int = 3) -> float:
    """Seconds to convert the model's state to an ArrayRecord and back, ``messages`` times (the app's path)."""
    from protocol.arrays import record_tensors, tensors_record

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(messages):
            record_tensors(tensors_record(state), copy=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    """Run both sides and print the breakdown."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--data-dir", default=os.environ.get("FLB_DATA_DIR", ""))
    p.add_argument("--nodes", type=int, default=0,
                   help="pack the clients as virtual-clients onto this many Flower nodes (default: one node per client)")
    args = p.parse_args(argv)
    nodes = args.nodes or args.clients
    gpus = 1.0 / nodes if args.device == "cuda" else 0.0
    packed = f"virtual-clients={args.clients}" if nodes != args.clients else ""
    with tempfile.TemporaryDirectory() as tmp:
        cfg, fed, out, _ = prepare(
            f"dataset='{args.dataset}' model='{args.model}' data-dir='{args.data_dir}' global-batch-size={args.batch} "
            f"num-server-rounds={args.rounds} eval-every={args.rounds} device='{args.device}' warmup-rounds=0 {packed}",
            f"num-supernodes={nodes} client-resources-num-cpus=1 client-resources-num-gpus={gpus}",
            str(Path(tmp) / "sim"))
        if launch(cfg, fed, out, quiet=True) != 0:
            raise SystemExit(f"the flwr run failed; see {out}/run.log")
        rounds = pd.read_csv(out / "rounds.csv").set_index("round").loc[2:args.rounds - 1]
        clients = pd.read_csv(out / "clients.csv")
    steady = clients[clients["round"].between(2, args.rounds - 1)]
    round_s = float(rounds["round_trip_s"].median())
    compute_s = float(steady.groupby("round")["compute_s"].max().median())
    server_s = float(rounds["server_s"].median())

    device = pick_device(args.device)
    workload = WORKLOADS[args.dataset]
    model = build_model(args.model, workload.input_shape, workload.num_classes, 0).to(device)
    splits = load_splits(args.dataset, args.data_dir, 0.1)
    torch_s = step_seconds(model, workload.loss(), lambda x: splits.inputs(x, device),
                           splits.x_train[:args.batch], splits.y_train[:args.batch])
    ser_s = serialize_seconds(model, 2 * args.clients)
    other_s = max(0.0, round_s - compute_s - ser_s)
    result = {"sim_round_s": round_s, "torch_step_s": torch_s, "ratio": torch_s / (round_s + server_s),
              "compute_s": compute_s, "serialize_s": ser_s, "server_s": server_s, "other_s": other_s}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model} on {args.dataset}, B={args.batch} over {args.clients} clients, {name}, torch {torch.__version__}")
    for key in ("sim_round_s", "compute_s", "serialize_s", "server_s", "other_s", "torch_step_s"):
        print(f"  {key:<14}{result[key]:>10.4f} s")
    print(" ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
