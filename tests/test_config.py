"""Bad input stops before anything expensive, with key, value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from flb.launch.run import parse_federation, parse_pairs, prepare
from server_app.preflight import parse_run_config
from tests.conftest import REPO_ROOT
from workloads import config_doc
from workloads.batches import check_batches_fit, split_global_batch
from workloads.config import RunConfig
from workloads.errors import ConfigError


def test_pyproject_defaults_equal_dataclass_defaults():
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert table == RunConfig.defaults()


def test_pyproject_and_docs_tables_are_generated_from_run_config():
    found = config_doc.check()
    assert not found, "\n".join([*found, f"Regenerate with: {config_doc.COMMAND}"])


def test_every_key_has_a_one_line_doc():
    docs = RunConfig.docs()
    assert list(docs) == list(RunConfig.keys())
    for key, doc in docs.items():
        assert doc.strip() and "\n" not in doc and "|" not in doc, key  # one row of the markdown table


def test_the_checker_names_the_key_that_differs_and_write_repairs_it(tmp_path):
    for target in config_doc.TARGETS:
        (tmp_path / target.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / target.path).write_text((REPO_ROOT / target.path).read_text())
    pyproject, docs = tmp_path / "pyproject.toml", tmp_path / "docs" / "run-config.md"
    pyproject.write_text(pyproject.read_text().replace("\nlr = 0.3\n", "\nlr = 0.5\n").replace("resume = false\n", ""))
    docs.write_text(docs.read_text().replace("server SGD momentum", "SGD momentum"))
    found = "\n".join(config_doc.check(tmp_path))
    assert "pyproject.toml: key 'lr' differs" in found and "lr = 0.5" in found and "lr = 0.3" in found
    assert "pyproject.toml: key 'resume' is missing" in found
    assert "docs/run-config.md: key 'momentum' differs" in found
    assert config_doc.main(["--root", str(tmp_path)]) == 1
    before = docs.read_text()
    assert config_doc.write(tmp_path) == ["pyproject.toml", "docs/run-config.md"]
    assert config_doc.check(tmp_path) == [] and config_doc.write(tmp_path) == []
    assert pyproject.read_text() == (REPO_ROOT / "pyproject.toml").read_text()
    assert docs.read_text() == before.replace("| SGD momentum", "| server SGD momentum")  # the prose is kept


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
        ({"num-server-rounds": 0}, ["'num-server-rounds'", "0", "> 0"]),
        ({"micro-batch-size": 300, "global-batch-size": 256}, ["'micro-batch-size'", "300", "1..256"]),
        ({"min-batch-fraction": 0.0}, ["'min-batch-fraction'", "0.0", "(0, 1]"]),
        ({"min-batch-fraction": 1.5}, ["'min-batch-fraction'", "1.5"]),
        ({"round-timeout-s": 0}, ["'round-timeout-s'", "> 0"]),
        ({"max-norm-ratio": 0.5}, ["'max-norm-ratio'", "0.5", "> 1"]),
        ({"checkpoint-every": -1}, ["'checkpoint-every'", "-1", ">= 0"]),
        ({"teacher-steps": "1:2"}, ["'teacher-steps'", "'1:2'", "starts ascending from 0"]),
        ({"device-profiles": "phone"}, ["'device-profiles'", "'phone'", "name:memory_mb"]),
        ({"teacher-switch": 1.5}, ["'teacher-switch'", "1.5", "whole number of rounds"]),
        ({"teacher-local-steps": 0}, ["'teacher-local-steps'", "0", "> 0"]),
        ({"teacher-val-batch": 0}, ["'teacher-val-batch'", "0", "> 0"]),
        ({"teacher-hyper-lr": -0.1}, ["'teacher-hyper-lr'", "-0.1", ">= 0"]),
        ({"teacher": "post-local", "teacher-switch": 60, "num-server-rounds": 60}, ["'teacher-switch'", "60", "1..59"]),
        ({"teacher": "post-local", "teacher-switch": 0.001, "num-server-rounds": 60}, ["'teacher-switch'", "0 large-batch rounds"]),
        ({"teacher-switch": -0.5}, ["'teacher-switch'", "-0.5", "[0, 1)"]),
        ({"teacher": "swap", "num-server-rounds": 1}, ["'num-server-rounds'", "'swap'", "at least 2"]),
        ({"teacher": "signed-noise", "min-batch-fraction": 0.5}, ["'min-batch-fraction'", "0.5", "signed-noise", "1.0"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(mapping, needles):
    with pytest.raises(ConfigError) as err:
        parse_run_config(mapping)
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
    assert "'global-batch-size' = 600" in str(err.value) and "300" in str(err.value) and "<= 500" in str(err.value)


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


@pytest.mark.parametrize(
    "run_config, needles",
    [
        ("device=cuda", ["'device' = 'cuda'", "no CUDA device", "auto, cpu, cuda"]),
        ("device-profiles='watch:0.2'", ["'device-profiles' entry 'watch' = 0.2 MiB is too small", "min-batch-fraction"]),
        ("train-limit=40", ["'train-limit' = 40", "Allowed: 0 or at least 256"]),
        ("global-batch-size=1600", ["'global-batch-size' = 1600", "larger than the smallest client partition"]),
        ("out-dir='/etc/hostname/run'", ["'out-dir' = '/etc/hostname/run' cannot be created", "not a folder"]),
    ],
)
def test_prepare_refuses_before_ray_starts(tmp_path, run_config, needles):
    if "cuda" in run_config:
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("a GPU is visible here")
    with pytest.raises(ConfigError) as err:
        prepare(run_config, "num-supernodes=8", "" if "out-dir" in run_config else str(tmp_path / "o"))
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert not (tmp_path / "o").exists()


def test_prepare_refuses_a_folder_that_holds_a_run(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "rounds.csv").write_text("round\n0\n")
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        prepare("", "num-supernodes=2", str(tmp_path / "o"))


def test_a_failing_minority_is_a_warning_when_min_batch_fraction_allows_it(tmp_path):
    # partition 3 of 4 gets a budget too small for its batch: 25% of the batch fails every round
    profiles = "big:0,big:0,big:0,watch:0.2"
    with pytest.raises(ConfigError, match="1 of 4 clients would fail"):
        prepare(f"device-profiles='{profiles}'", "num-supernodes=4", str(tmp_path / "o"))
    *_, warnings = prepare(f"device-profiles='{profiles}' min-batch-fraction=0.75", "num-supernodes=4", str(tmp_path / "o"))
    assert len(warnings) == 1 and "partition 3" in warnings[0]


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
        [sys.executable, "-m", "flb.launch", "--run-config", "dataset=imagenet", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2
    assert "'dataset' = 'imagenet' is not allowed" in res.stderr and "cifar10" in res.stderr
    assert not out.exists()
