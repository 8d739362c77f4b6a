"""Virtual clients packed onto few Flower nodes: the bundle format, the fast array path, exactness, faults."""

from __future__ import annotations

import csv
import pickle
import threading

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client_app.app import app as client_app
from client_app.packing import answer_bundle
from experiments.faults import Fault, FaultyClientApp
from flb.inprocess import client_context, delivered, run_inprocess
from server_app.grid import PackedGrid
from protocol.arrays import out_of_band, record_tensors, tensors_record
from protocol.packing import PACK, bundle, unbundle, virtual_node
from workloads.config import ConfigError, RunConfig

BASE = {"dataset": "digits", "num-server-rounds": 4, "eval-every": 4, "global-batch-size": 64, "clients-per-round": 8}


def test_bundle_stores_a_shared_record_once_and_unbundles_exactly():
    weights = ArrayRecord({"w": torch.arange(6.0).reshape(2, 3)})
    contents = [RecordDict({"arrays": weights, "config": ConfigRecord({"lr": 0.1 * j})}) for j in range(3)]
    packed = bundle(contents, {"nodes": [4, 5, 6], "types": ["train"] * 3})
    assert len(packed.array_records) == 1  # the global weights travel once, not three times
    parts, meta = unbundle(packed)
    assert meta["nodes"] == [4, 5, 6] and len(parts) == 3
    for j, part in enumerate(parts):
        assert torch.equal(part["arrays"].to_torch_state_dict()["w"], torch.arange(6.0).reshape(2, 3))
        assert part["config"]["lr"] == pytest.approx(0.1 * j)
    broken = bundle(contents, {"nodes": [4, 5, 6]})
    broken[PACK]["nodes"] = [4, 5]
    with pytest.raises(ValueError, match="lists 2 'nodes'"):
        unbundle(broken)


def test_array_fast_path_matches_flower_bytes_and_values():
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.tensor(2.5),
               "d": torch.randn(4, 3).t()}  # non-contiguous
    ours, flowers = tensors_record(tensors), ArrayRecord({k: v.contiguous() for k, v in tensors.items()})
    for name, t in tensors.items():
        assert ours[name].data == flowers[name].data, name  # the same .npy bytes as np.save writes
        for copy in (True, False):
            back = record_tensors(flowers, copy=copy)[name]
            assert back.dtype == t.dtype and torch.equal(back, t), name
    truncated = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=flowers["a"].data[:-4])
    with pytest.raises(ValueError):  # a short payload takes np.load's path, which refuses it
        record_tensors(ArrayRecord({"a": truncated}))


def test_out_of_band_arrays_travel_without_in_band_copies_and_read_back_equal():
    tensors = {"g": torch.randn(64, 32), "b": torch.randn(7)}
    record = out_of_band(tensors_record(tensors))
    buffers = []
    payload = pickle.dumps(record, protocol=5, buffer_callback=buffers.append)  # as Ray serialises a result
    assert sum(memoryview(b).nbytes for b in buffers) > 64 * 32 * 4 and len(payload) < 4096  # bytes went out of band
    back = pickle.loads(payload, buffers=buffers)
    for copy in (True, False):
        for name, t in record_tensors(back, copy=copy).items():
            assert torch.equal(t, tensors[name]), name

    def app(msg, context):
        return Message(RecordDict({"grads": tensors_record(tensors)}), reply_to=msg)

    msg = Message(bundle([RecordDict({"config": ConfigRecord({})})], {"nodes": [1], "types": ["train"]}),
                  message_type="train.packed", dst_node_id=3)
    reply = answer_bundle(app, delivered(msg), client_context(3, 0, 1, RunConfig(virtual_clients=2).to_mapping()))
    inner, _ = unbundle(reply.content)
    assert all(isinstance(a.data, bytes) for a in inner[0]["grads"].values())  # outside Ray: plain bytes (gRPC needs them)


def test_virtual_clients_train_exactly_as_one_node_per_client(tmp_path, one_thread):
    plain = run_inprocess(BASE | {"out-dir": str(tmp_path / "plain")}, 16)
    packed = run_inprocess(BASE | {"out-dir": str(tmp_path / "packed"), "virtual-clients": 16}, 3)
    a, b = torch.load(plain / "model.pt"), torch.load(packed / "model.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    rows = [[(int(r["round"]), int(r["partition_id"]), int(r["local_batch"])) for r in csv.DictReader(open(d / "clients.csv"))]
            for d in (plain, packed)]
    assert rows[0] == rows[1] and len(rows[0]) == 4 * 8
    assert {int(r["node_id"]) for r in csv.DictReader(open(packed / "clients.csv"))} <= {virtual_node(p) for p in range(16)}


def test_client_threads_compute_exactly_as_one_client_at_a_time(tmp_path, one_thread, monkeypatch):
    import client_app.app as capp

    seen: list[tuple[int, str, int]] = []  # (round, thread, torch intra-op threads) of every client step
    rnd = [0]
    check, step = capp._check_memory, capp.batch_gradient

    def check_memory(cfg, r):
        rnd[0] = r
        return check(cfg, r)

    def batch_gradient(*args, **kwargs):
        seen.append((rnd[0], threading.current_thread().name, torch.get_num_threads()))
        return step(*args, **kwargs)

    monkeypatch.setattr(capp, "_check_memory", check_memory)
    monkeypatch.setattr(capp, "batch_gradient", batch_gradient)
    plain = run_inprocess(BASE | {"out-dir": str(tmp_path / "plain")}, 16)
    seen.clear()
    packed = run_inprocess(BASE | {"out-dir": str(tmp_path / "threads"), "virtual-clients": 16, "client-threads": 3}, 2)
    a, b = torch.load(plain / "model.pt"), torch.load(packed / "model.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0  # the same bytes as one client at a time
    by_round = {r: [name for rr, name, _ in seen if rr == r] for r in (1, 2, 3, 4)}
    # rounds 1 and 4 measure memory (a profiled replay per client): one client at a time, in the calling thread
    assert len(by_round[1]) == len(by_round[4]) == 2 * 8 and not any("flb-client" in n for n in by_round[1] + by_round[4])
    # rounds 2 and 3: 3 clients at a time in the pool, but the first client of the process's first
    # such bundle, which runs alone (it builds what the process caches)
    assert len(by_round[2]) == len(by_round[3]) == 8
    assert sum("flb-client" not in n for n in by_round[2]) == 1 and all("flb-client" in n for n in by_round[3])
    assert {n for _, _, n in seen} == {1}  # one intra-op thread in every client step
    seen.clear()  # without memory checks: only the very first client of the process's first bundle runs alone
    quiet = run_inprocess(BASE | {"out-dir": str(tmp_path / "quiet"), "virtual-clients": 16, "client-threads": 3,
                                  "memory-check-every": -1}, 2)
    c = torch.load(quiet / "model.pt")
    assert max(float((a[k] - c[k]).abs().max()) for k in a) == 0.0
    assert sum("flb-client" not in name for _, name, _ in seen) == 1 and len(seen) == 4 * 8
    with pytest.raises(ConfigError, match="'client-threads' = -1: must be >= 0"):
        RunConfig(client_threads=-1).validate()


def test_a_failing_virtual_client_fails_alone(tmp_path, one_thread):
    schedule = {(2, 5): Fault("crash"), (2, 6): Fault("nan"), (3, 0): Fault("scale", 1e6)}
    faulty = FaultyClientApp(client_app, lambda rnd, pid: schedule.get((rnd, pid)))

    def app(msg: Message, context) -> Message:  # bundles are unpacked here, so each inner client meets the faults
        return answer_bundle(faulty, msg, context) if msg.metadata.message_type.endswith(".packed") else faulty(msg, context)

    cfg = BASE | {"clients-per-round": 16, "virtual-clients": 16, "min-batch-fraction": 0.8,
                  "out-dir": str(tmp_path / "faulty")}
    out = run_inprocess(cfg, 2, client_app=app)
    failures = list(csv.DictReader(open(out / "failures.csv")))
    assert [(int(f["round"]), int(f["partition_id"])) for f in failures] == [(2, 5), (2, 6), (3, 0)]
    assert "injected crash" in failures[0]["reason"] and "non-finite" in failures[1]["reason"]
    rounds = {int(r["round"]): r for r in csv.DictReader(open(out / "rounds.csv"))}
    assert [int(rounds[r]["global_batch"]) for r in (1, 2, 3, 4)] == [64, 56, 60, 64]
    assert all(torch.isfinite(v).all() for v in torch.load(out / "model.pt").values())


class _TwoNodeGrid:
    """Flower nodes 7 and 9 answering bundles through the real ClientApp; node 9 can be made silent."""

    def __init__(self, run_config: dict) -> None:
        self.run_config, self.silent, self.calls = run_config, False, []

    def get_node_ids(self) -> list[int]:
        return [7, 9]

    def send_and_receive(self, messages, *, timeout=None):
        self.calls.append(sorted(m.metadata.dst_node_id for m in messages))
        replies = []
        for m in messages:
            if self.silent and m.metadata.dst_node_id == 9:
                continue
            ctx = client_context(m.metadata.dst_node_id, 0, 2, self.run_config)
            replies.append(answer_bundle(client_app, delivered(m), ctx))
        return replies


def test_packed_grid_leaves_out_a_silent_node():
    run_config = RunConfig(virtual_clients=6).to_mapping()
    grid = PackedGrid(_TwoNodeGrid(run_config), 6)
    assert grid.get_node_ids() == [virtual_node(p) for p in range(6)]

    def identify(nodes):
        return [Message(RecordDict({"config": ConfigRecord({})}), message_type="query.identify", dst_node_id=n)
                for n in nodes]

    replies = grid.send_and_receive(identify(grid.get_node_ids()), timeout=5)
    assert sorted(int(r.content["metrics"]["partition-id"]) for r in replies) == list(range(6))
    assert {grid.destinations[r.metadata.reply_to_message_id] for r in replies} == set(grid.get_node_ids())
    grid._grid.silent = True
    replies = grid.send_and_receive(identify(grid.get_node_ids()), timeout=5)
    assert sorted(int(r.content["metrics"]["partition-id"]) for r in replies) == [0, 1, 2]  # node 9's half is lost
    grid.send_and_receive(identify(grid.get_node_ids()), timeout=5)
    assert grid._grid.calls[-1] == [7]  # and node 9 is left out of the next call


def test_virtual_clients_refused_where_they_cannot_work(tmp_path):
    with pytest.raises(ConfigError, match="'clients-per-round' = 9: more than virtual-clients = 8"):
        RunConfig(virtual_clients=8, clients_per_round=9).validate()
    with pytest.raises(ConfigError, match="'virtual-clients' = -1"):
        RunConfig(virtual_clients=-1).validate()
    msg = Message(bundle([RecordDict({"config": ConfigRecord({})})], {"nodes": [1], "types": ["query.identify"]}),
                  message_type="query.packed", dst_node_id=3)
    ctx = client_context(3, 0, 1, RunConfig(virtual_clients=4).to_mapping())
    ctx.node_config["data-dir"] = str(tmp_path)
    with pytest.raises(ConfigError, match="node-local data"):
        answer_bundle(client_app, delivered(msg), ctx)
    with pytest.raises(ConfigError, match="'virtual-clients' = 0"):
        answer_bundle(client_app, delivered(msg), client_context(3, 0, 1, RunConfig().to_mapping()))


def test_answer_bundle_reports_each_inner_error():
    def app(msg, context):
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("boom")
        return Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=msg)

    contents = [RecordDict({"config": ConfigRecord({})}) for _ in range(3)]
    msg = Message(bundle(contents, {"nodes": [1, 2, 3], "types": ["query"] * 3}), message_type="query.packed",
                  dst_node_id=3)
    reply = answer_bundle(app, delivered(msg), client_context(3, 0, 1, RunConfig(virtual_clients=3).to_mapping()))
    parts, meta = unbundle(reply.content)
    assert meta["errors"] == ["", "RuntimeError: boom", ""]
    assert [len(p.metric_records) for p in parts] == [1, 0, 1]
    assert parts[2]["metrics"]["x"] == 1.0
