"""Every notebook runs top to bottom at its smoke size (FLB_SMOKE=1), so none of them rots."""

from __future__ import annotations

import pytest

from experiments.notebooks import NOTEBOOKS, execute


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_runs_at_smoke_size(path, tmp_path):
    seconds = execute(path, smoke=True, workdir=tmp_path, timeout_s=600)
    print(f"{path.name}: {seconds:.1f} s")
