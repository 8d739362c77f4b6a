"""What secure aggregation costs: seconds per round, bytes per client, and the step's exactness.

``python -m experiments.bench_secagg [--rounds 12] [--clients 8] [--engine inprocess|ray]``

Digits MLP (26,122 parameters), ``--clients`` clients of a global batch of 256, plain and with
``secure-aggregation``, same seed. Printed per mode:

- ``s_per_round``: median wall seconds of rounds 2..R (round 1 holds start-up; the round
  rows' ``wall_s`` differences, evaluation excluded by ``eval-every`` = R);
- ``bytes_per_client``: in-process engine only, the serialised size (Flower's protobuf,
  ``recorddict_to_proto``) of every message a client received and sent, per round, counted at
  the ClientApp boundary (down / up / total). Ray moves the same messages;
- ``round_trips``: messages a client answers per round (1 plain, 4 SecAgg+; plus the one-off
  identify query spread over the rounds).

Then the exactness of one step: round 1 with lr = 1 and no momentum or weight decay, so
w_1 = w_0 - G; ``secagg_rel_diff`` = |G_secure - G_plain| / |G_plain|, next to the bound of
strategies/secure.py; and the masks' generator cost for this model (Flower's 32-bit-seeded
NumPy generator against ``shake_mask``). The last line is
``secagg_round_ratio=<x> secagg_bytes_ratio=<y> secagg_rel_diff=<z> bound_rel=<b>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

BASE = {"dataset": "digits", "model": "mlp", "global-batch-size": 256, "seed": 1, "memory-check-every": -1}
STEP = {"num-server-rounds": 1, "lr": 1.0, "schedule": "constant", "warmup-rounds": 0, "momentum": 0.0,
        "weight-decay": 0.0}


class CountingClient:
    """The real ClientApp, counting the serialised bytes of what each node receives and sends."""

    def __init__(self) -> None:
        from client_app.app import app

        self.app = app
        self.down: dict[int, int] = defaultdict(int)
        self.up: dict[int, int] = defaultdict(int)
        self.messages: dict[int, int] = defaultdict(int)

    def __call__(self, msg, context):
        from flwr.common.serde import recorddict_to_proto

        node = context.node_id
        self.down[node] += recorddict_to_proto(msg.content).ByteSize()
        reply = self.app(msg, context)
        if not reply.has_error():
            self.up[node] += recorddict_to_proto(reply.content).ByteSize()
        self.messages[node] += 1
        return reply


def measure(secure: bool, rounds: int, clients: int, engine: str, root: Path) -> dict[str, float]:
    """One run of ``rounds`` rounds; its seconds per round and (in process) bytes per client per round."""
    import flb

    config = BASE | {"num-server-rounds": rounds, "eval-every": rounds, "secure-aggregation": secure}
    counter = CountingClient() if engine == "inprocess" else None
    run = flb.run(config, clients=clients, engine=engine, out=root / f"{'secure' if secure else 'plain'}-{engine}",
                  progress=False, force=True, client_app=counter)
    wall = pd.read_csv(run.folder / "rounds.csv").set_index("round")["wall_s"]
    out = {"s_per_round": statistics.median(wall.diff().loc[2:rounds - 1 if rounds > 3 else rounds])}
    if counter is not None:
        n = clients * rounds
        out |= {"bytes_down": sum(counter.down.values()) / n, "bytes_up": sum(counter.up.values()) / n,
                "round_trips": sum(counter.messages.values()) / n}
        out["bytes_per_client"] = out["bytes_down"] + out["bytes_up"]
    return out


def step_difference(clients: int, root: Path) -> tuple[float, float]:
    """(|G_secure - G_plain| / |G_plain|, the documented bound / |G_plain|) for round 1."""
    from flb.inprocess import run_inprocess
    from strategies.secure import quantisation_bound, secagg_params
    from workloads.batches import split_global_batch
    from workloads.config import RunConfig
    from workloads.models import build_model
    from workloads.registry import WORKLOADS

    weights = {}
    for secure in (False, True):
        out = run_inprocess(BASE | STEP | {"eval-every": 1, "secure-aggregation": secure,
                                           "out-dir": str(root / f"step-{secure}")}, clients)
        weights[secure] = torch.load(out / "model.pt")
    w = WORKLOADS["digits"]
    w0 = build_model("mlp", w.input_shape, w.num_classes, BASE["seed"]).state_dict()
    flat = {s: np.concatenate([(w0[k].double() - v[k].double()).flatten().numpy() for k in w0]) for s, v in weights.items()}
    norm = np.linalg.norm(flat[False])
    batches = split_global_batch(BASE["global-batch-size"], clients)
    bound = quantisation_bound(secagg_params(RunConfig.from_mapping(BASE | STEP), batches), flat[False].size, sum(batches))
    return float(np.linalg.norm(flat[True] - flat[False]) / norm), bound / norm


def mask_seconds(dims: list[tuple[int, ...]], reps: int = 20) -> tuple[float, float]:
    """Seconds per mask for ``dims``: Flower's ``pseudo_rand_gen`` and ``shake_mask``."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from protocol.secure import shake_mask

    seed = os.urandom(32)
    times = []
    for fn in (pseudo_rand_gen, shake_mask):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(seed, 2**32, dims)
        times.append((time.perf_counter() - t0) / reps)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--engine", choices=("inprocess", "ray"), default="inprocess")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        figures = {s: measure(s, args.rounds, args.clients, args.engine, root) for s in (False, True)}
        rel, bound = step_difference(args.clients, root)
    for secure, f in figures.items():
        print(("secure " if secure else "plain  ") + " ".join(f"{k}={v:.4g}" for k, v in f.items()))
    from workloads.models import build_model

    from workloads.registry import WORKLOADS

    w = WORKLOADS["digits"]
    dims = [tuple(p.shape) for p in build_model("mlp", w.input_shape, w.num_classes, 0).parameters()] + [(4,)]
    flower_s, shake_s = mask_seconds(dims)
    print(f"mask_s_flower={flower_s:.3g} mask_s_shake={shake_s:.3g}")
    ratio = figures[True]["s_per_round"] / figures[False]["s_per_round"]
    line = f"secagg_round_ratio={ratio:.3g}"
    if "bytes_per_client" in figures[True]:
        line += f" secagg_bytes_ratio={figures[True]['bytes_per_client'] / figures[False]['bytes_per_client']:.3g}"
    print(line + f" secagg_rel_diff={rel:.3g} bound_rel={bound:.3g}")


if __name__ == "__main__":
    main()
