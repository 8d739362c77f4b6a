"""average-from: the server's tail mean of the global models (strategies/tail_average.py)."""

from __future__ import annotations

from collections import OrderedDict

import pandas as pd
import pytest
import torch

import strategies.server_step as server_step_module
from flb.inprocess import run_inprocess
from server_app.preflight import parse_run_config
from strategies.server_opt import running_mean
from strategies.server_state import ServerState
from strategies.tail_average import average_start, with_average
from tests.resume import crash_then_resume, max_model_difference
from workloads.config import RunConfig
from workloads.errors import ConfigError

BASE = {"dataset": "digits", "num-server-rounds": 8, "global-batch-size": 64, "lr": 0.5, "eval-every": 2,
        "warmup-rounds": 1}


def test_running_mean_is_the_mean_of_every_model_given():
    gen = torch.Generator().manual_seed(0)
    models = [[torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)] for _ in range(7)]
    mean = None
    for k, m in enumerate(models, start=1):
        mean = running_mean(mean, m, k)
    for i, got in enumerate(mean):
        assert torch.allclose(got, torch.stack([m[i] for m in models]).mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="count must be >= 1"):
        running_mean(None, models[0], 0)


def test_with_average_starts_after_round_a_and_keeps_integer_buffers_of_the_last_model():
    cfg = RunConfig().replace(num_server_rounds=6, average_from=3)
    state, seen = ServerState(model=OrderedDict(w=torch.zeros(2), n=torch.tensor(0))), []
    for rnd in range(1, 7):
        model = OrderedDict(w=torch.full((2,), float(rnd * rnd)), n=torch.tensor(rnd))
        state = with_average(ServerState(model=model, round=rnd, average=state.average, averaged=state.averaged), cfg)
        seen.append((rnd, state.averaged))
    assert seen == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 2), (6, 3)]
    assert state.average["w"].tolist() == pytest.approx([(16 + 25 + 36) / 3] * 2)
    assert int(state.average["n"]) == 6
    restored = ServerState.from_dict(state.to_dict())
    assert restored.averaged == 3 and torch.equal(restored.average["w"], state.average["w"])


@pytest.mark.parametrize(("value", "rounds", "start"), [(0, 10, 0), (0.75, 8, 6), (0.5, 10, 5), (9, 10, 9)])
def test_average_start_reads_a_fraction_or_a_round_count(value, rounds, start):
    assert average_start(RunConfig().replace(num_server_rounds=rounds, average_from=value)) == start


@pytest.mark.parametrize(("value", "message"), [
    (-0.5, "'average-from' = -0.5: must be 0 .off.*"), (2.5, "'average-from' = 2.5: must be 0"),
    (8, "'average-from' = 8 gives round 8 of num-server-rounds = 8: no round would be averaged.*1..7"),
])
def test_a_bad_average_from_names_the_key_the_value_and_what_is_allowed(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(BASE | {"average-from": value})


def test_the_run_delivers_the_mean_of_the_last_rounds_models_and_trains_the_last_one(tmp_path, monkeypatch):
    models, original = [], server_step_module.with_average

    def recording(state, cfg):
        models.append((state.round, OrderedDict((k, v.clone()) for k, v in state.model.items())))
        return original(state, cfg)

    monkeypatch.setattr(server_step_module, "with_average", recording)
    plain = run_inprocess(BASE | {"out-dir": str(tmp_path / "plain")}, num_clients=4)
    averaged = run_inprocess(BASE | {"average-from": 0.5, "out-dir": str(tmp_path / "avg")}, num_clients=4)
    last = models[-1][1]
    plain_model, avg_model = torch.load(plain / "model.pt"), torch.load(averaged / "model.pt")
    assert all(torch.equal(plain_model[k], last[k]) for k in last)  # averaging does not change training
    checkpoint = torch.load(averaged / "checkpoint.pt")["strategy"]["model"]
    assert all(torch.equal(checkpoint[k], last[k]) for k in last)  # the checkpoint goes on from the last model
    tail = [m for rnd, m in models[8:] if rnd > 4]  # the averaged run's rounds 5..8
    assert len(tail) == 4
    for k, v in avg_model.items():
        assert torch.allclose(v, torch.stack([m[k] for m in tail]).mean(0), atol=1e-6), k
    assert max(float((avg_model[k] - last[k]).abs().max()) for k in last) > 1e-3  # the mean is not the last model
    rounds = pd.read_csv(averaged / "rounds.csv").set_index("round")
    assert rounds.loc[[6, 8], "last_val_accuracy"].notna().all() and pd.isna(rounds.loc[4, "last_val_accuracy"])
    assert rounds.loc[8, "val_accuracy"] > 0.5 and rounds.loc[8, "last_val_accuracy"] > 0.5


def test_an_interrupted_averaged_run_resumes_to_the_uninterrupted_model(tmp_path):
    config = BASE | {"average-from": 3, "checkpoint-every": 2, "max-failed-rounds": 0}
    folder_a, folder_b = crash_then_resume(config, tmp_path, crash_round=6, checkpoint_round=4)
    assert max_model_difference(folder_a, folder_b) == 0.0
    assert torch.load(folder_b / "checkpoint.pt")["strategy"]["averaged"] == 5
