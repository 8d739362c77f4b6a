"""The launcher's pieces that need no SuperLink: the staged app and the process-tree memory."""

from __future__ import annotations

import io
import os
import zipfile

from experiments.bench_scale import _tree_memory_mb
from flb.launch.superlink import REPO_ROOT, stage_app


def test_the_staged_app_builds_the_same_fab_without_the_environment(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    staged = stage_app(REPO_ROOT, tmp_path / "app")
    names = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert {"pyproject.toml", "server_app/app.py", "client_app/app.py", "strategies/large_batch.py"} <= names
    assert not any(n.startswith((".venv/", ".git/", ".flwr/")) or "/__pycache__/" in n or n.endswith(".pyc")
                   for n in names)
    assert not any(n.startswith(("results/", "notebooks/", "experiments/results/")) for n in names)
    fab = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(staged))).namelist())
    # every Python module of the apps is in the FAB built from the copy
    assert {n for n in names if n.endswith(".py") and n.split("/")[0] in ("server_app", "client_app", "strategies",
                                                                          "estimators", "workloads")} <= fab


def test_the_tree_memory_names_each_process():
    rows = _tree_memory_mb(os.getpid())
    assert rows and rows[0][0].endswith(f"({os.getpid()})")
    assert all(rss >= pss > 0 for _, rss, pss in rows[:1])
