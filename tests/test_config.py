"""Bad input stops before anything expensive, with key, value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from experiments.run import parse_federation, parse_pairs, prepare
from tests.conftest import REPO_ROOT
from workloads.config import ConfigError, RunConfig, check_batches_fit, split_global_batch


def test_pyproject_defaults_equal_dataclass_defaults():
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert table == RunConfig.defaults()


def test_empty_run_config_gives_defaults():
    # run_simulation passes an empty run_config; the apps must still work
    assert RunConfig.from_mapping({}) == RunConfig()


@pytest.mark.parametrize(
    "mapping, needles",
    [
        ({"dataset": "imagenet"}, ["'dataset'", "'imagenet'", "digits, mnist, cifar10"]),
        ({"model": "resnet18"}, ["'model'", "'resnet18'", "mlp, cnn"]),
        ({"global-batch-size": 0}, ["'global-batch-size'", "0", "> 0"]),
        ({"global-batch-size": -8}, ["'global-batch-size'", "-8"]),
        ({"micro-batch-size": -1}, ["'micro-batch-size'", "-1", ">= 0"]),
        ({"local-steps": 0}, ["'local-steps'", "> 0"]),
        ({"lr": 0}, ["'lr'", "> 0"]),
        ({"momentum": 1.0}, ["'momentum'", "[0, 1)"]),
        ({"partitioner": "shards"}, ["'partitioner'", "'shards'", "iid, dirichlet"]),
        ({"schedule": "step"}, ["'schedule'", "constant, cosine, linear"]),
        ({"teacher": "oracle"}, ["'teacher'", "'oracle'", "none"]),
        ({"global-batch-size": "big"}, ["'global-batch-size'", "'big'", "int"]),
        ({"augment": 3}, ["'augment'", "bool"]),
        ({"golbal-batch-size": 64}, ["'golbal-batch-size'", "Did you mean 'global-batch-size'"]),
        ({"clients-per-round": 8, "global-batch-size": 4}, ["'global-batch-size'", "clients-per-round = 8"]),
        ({"val-fraction": 0.7}, ["'val-fraction'", "(0, 0.5)"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(mapping, needles):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(mapping)
    for needle in needles:
        assert needle in str(err.value)


def test_split_global_batch_sums_and_balances():
    assert split_global_batch(23, 3) == [8, 8, 7]
    assert sum(split_global_batch(1024, 7)) == 1024
    with pytest.raises(ConfigError, match="global-batch-size"):
        split_global_batch(2, 3)


def test_batch_larger_than_partition_is_rejected():
    with pytest.raises(ConfigError) as err:
        check_batches_fit([300, 300], [250, 400])
    assert "'global-batch-size'" in str(err.value) and "300" in str(err.value) and "<= 500" in str(err.value)


def test_prepare_checks_partitions_and_data_before_starting(tmp_path):
    with pytest.raises(ConfigError, match="larger than the smallest client partition"):
        prepare("global-batch-size=4000", "num-supernodes=8", str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="'clients-per-round' = 9"):
        prepare("clients-per-round=9", "num-supernodes=4", str(tmp_path / "o"))
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as err:
        prepare(f"dataset=cifar10 data-dir='{missing}'", "", str(tmp_path / "o"))
    assert "'data-dir'" in str(err.value) and str(missing) in str(err.value) and "does not exist" in str(err.value)
    assert not (tmp_path / "o").exists()  # nothing was started or written


def test_launcher_parsing():
    assert parse_pairs('dataset=cifar10 lr=0.5 augment=false out-dir="/x y"') == {
        "dataset": "cifar10", "lr": 0.5, "augment": False, "out-dir": "/x y"}
    assert parse_federation("num-supernodes=3")["client-resources-num-cpus"] == 1
    with pytest.raises(ConfigError, match="'num-supernode' is unknown"):
        parse_federation("num-supernode=3")
    with pytest.raises(ConfigError, match="could not parse"):
        parse_pairs("dataset")


def test_launcher_exits_2_on_bad_config_without_starting(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--run-config", "dataset=imagenet", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2
    assert "'dataset' = 'imagenet' is not allowed" in res.stderr and "cifar10" in res.stderr
    assert not out.exists()
