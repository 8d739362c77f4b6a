"""The results folder's CSVs: formatted once per row, and always the same text as a full rewrite."""

from __future__ import annotations

import csv
import io

from server_app.results import _CsvText


def _full_rewrite(rows, first):
    columns = list(first)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def test_incremental_csv_equals_a_full_rewrite_as_rows_and_columns_appear():
    text, rows = _CsvText(["round", "lr"]), []
    for i in range(60):
        row = {"round": i, "lr": 0.1 / (i + 1), "wall_s": 1.5 * i}
        if i > 20:
            row["reason, quoted"] = 'a "late" client'  # a column that needs quoting appears at round 21
        if i % 7 == 0:
            row["teacher_scale"] = 2.0 ** -i  # a column present in some rows only
        rows.append(row)
        assert text.text(rows) == _full_rewrite(rows, ["round", "lr"]), i
    kept = rows[:10]  # a resumed run reloads a shorter list: the cache starts again
    assert text.text(kept) == _full_rewrite(kept, ["round", "lr"])
    parsed = list(csv.DictReader(io.StringIO(text.text(rows))))
    assert len(parsed) == 60 and parsed[25]["reason, quoted"] == 'a "late" client' and parsed[3]["teacher_scale"] == ""
