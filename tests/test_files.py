"""Atomic writes: the file is the old one or the new one, never torn, and no temporary is left."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from workloads.files import atomic_save_figure, atomic_write_bytes, atomic_write_text, remove_stale_temporaries


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "rows.csv"
    atomic_write_text(path, "a,b\n1,2\n")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # fails inside the write, after mkstemp
    assert path.read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_a_figure_is_written_whole_or_not_at_all(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "sub" / "bars.png"
    atomic_save_figure(fig, path, dpi=50)
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 500
    with pytest.raises(ValueError):  # an unknown format fails while rendering, before any file is touched
        atomic_save_figure(fig, tmp_path / "sub" / "bars.nosuchformat")
    plt.close(fig)
    assert path.read_bytes() == png
    assert sorted(p.name for p in path.parent.iterdir()) == ["bars.png"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / ".rounds.csv.x1y2.tmp").write_text("half a ro")
    (tmp_path / "rounds.csv").write_text("whole\n")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".rounds.csv.x1y2.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["rounds.csv"]
