"""The run-config tables of pyproject.toml and docs/run-config.md, generated from ``RunConfig``.

``workloads.config.RunConfig`` is the one source of the run-config keys, their defaults and
their one-line docs. This module writes them out as ``[tool.flwr.app.config]`` in
``pyproject.toml`` (the defaults Flower reads) and as the keys table of ``docs/run-config.md``
(between two HTML comments), and checks that both files hold exactly that::

    .venv/bin/python -m workloads.config_doc           # check: exit 1 naming each key that differs
    .venv/bin/python -m workloads.config_doc --write   # rewrite both tables in place

Everything else in the two files is left as it is. ``tests/test_config.py`` runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workloads.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python -m workloads.config_doc --write"
TABLE = "[tool.flwr.app.config]"
DOCS_BEGIN = f"<!-- The keys table is generated from workloads/config.py (RunConfig): edit it there, then run `{COMMAND}`. -->"
DOCS_END = "<!-- End of the generated keys table. -->"


def toml_value(value: Any) -> str:
    """A default as TOML writes it (``true``, ``0.0005``, ``"digits"``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: the same escapes as JSON for these values
    return repr(value)


def pyproject_lines() -> list[str]:
    """The ``[tool.flwr.app.config]`` table with the comment above it."""
    return [
        "# The run-config defaults, generated from workloads.config.RunConfig, which documents every key",
        f"# (docs/run-config.md lists them). Edit RunConfig, then run `{COMMAND}`;",
        "# tests/test_config.py fails when this table differs from RunConfig.",
        TABLE,
        *(f"{key} = {toml_value(value)}" for key, value in RunConfig.defaults().items()),
    ]


def docs_lines() -> list[str]:
    """The keys table of docs/run-config.md between its two markers."""
    docs = RunConfig.docs()
    return [
        DOCS_BEGIN,
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
        *(f"| `{key}` | `{toml_value(value)}` | {docs[key]} |" for key, value in RunConfig.defaults().items()),
        "",
        DOCS_END,
    ]


def _pyproject_region(lines: list[str]) -> tuple[int, int]:
    """Lines [start, end) of the table: the comment lines right above its header to the next table."""
    if TABLE not in lines:
        raise ValueError(f"no {TABLE} table")
    start = end = lines.index(TABLE)
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    while end + 1 < len(lines) and not lines[end + 1].startswith("["):
        end += 1
    while not lines[end].strip() or lines[end].startswith("#"):  # blank lines and the next table's comment
        end -= 1
    return start, end + 1


def _docs_region(lines: list[str]) -> tuple[int, int]:
    """Lines [start, end) from the begin marker to the end marker."""
    begin = [i for i, line in enumerate(lines) if line.startswith("<!-- The keys table is generated")]
    if len(begin) != 1 or DOCS_END not in lines[begin[0]:]:
        raise ValueError(f"no single generated keys table (between '{DOCS_BEGIN[:40]}...' and '{DOCS_END}')")
    return begin[0], lines.index(DOCS_END, begin[0]) + 1


def _toml_key(line: str) -> str | None:
    match = re.match(r"([A-Za-z0-9_-]+)\s*=", line)
    return match.group(1) if match else None


def _docs_key(line: str) -> str | None:
    match = re.match(r"\|\s*`([^`]+)`\s*\|", line)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Target:
    """A file with one generated region."""

    path: str
    generate: Callable[[], list[str]]
    region: Callable[[list[str]], tuple[int, int]]
    key_of: Callable[[str], str | None]


TARGETS = (
    Target("pyproject.toml", pyproject_lines, _pyproject_region, _toml_key),
    Target("docs/run-config.md", docs_lines, _docs_region, _docs_key),
)


def differences(where: str, current: list[str], expected: list[str], key_of: Callable[[str], str | None]) -> list[str]:
    """What differs between a file's region and the generated one, key by key."""
    have = {k: line for line in current if (k := key_of(line))}
    want = {k: line for line in expected if (k := key_of(line))}
    found = []
    for key, line in want.items():
        if key not in have:
            found.append(f"{where}: key '{key}' is missing; RunConfig generates: {line}")
        elif have[key] != line:
            found.append(f"{where}: key '{key}' differs from RunConfig.\n  file:      {have[key]}\n  RunConfig: {line}")
    found += [f"{where}: key '{key}' is not a RunConfig field: {have[key]}" for key in have if key not in want]
    if not found and current != expected:
        changed = next(f"{a!r} != {b!r}" for a, b in zip([*current, ""], [*expected, ""]) if a != b)
        found.append(f"{where}: the keys agree but the lines around them or their order differ: {changed}")
    return found


def check(root: Path = REPO_ROOT) -> list[str]:
    """Every difference between the files under ``root`` and what RunConfig generates ([] when none)."""
    found = []
    for target in TARGETS:
        lines = (root / target.path).read_text().splitlines()
        try:
            start, end = target.region(lines)
        except ValueError as err:
            found.append(f"{target.path}: {err}")
            continue
        found += differences(target.path, lines[start:end], target.generate(), target.key_of)
    return found


def write(root: Path = REPO_ROOT) -> list[str]:
    """Rewrite the generated regions of the files under ``root``; return the paths that changed."""
    changed = []
    for target in TARGETS:
        path = root / target.path
        text = path.read_text()
        lines = text.splitlines()
        start, end = target.region(lines)
        lines[start:end] = target.generate()
        new = "\n".join(lines) + ("\n" if text.endswith("\n") else "")
        if new != text:
            path.write_text(new)
            changed.append(target.path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the tables in place (default: check only)")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    if args.write:
        changed = write(args.root)
        print(f"rewrote {', '.join(changed)}" if changed else "the tables already agree with RunConfig")
        return 0
    found = check(args.root)
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print(f"run `{COMMAND}` to regenerate", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
