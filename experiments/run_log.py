"""A JSON-lines log of finished experiment runs, keyed by their settings, so experiments resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workloads.files import atomic_write_text


class RunLog:
    """Finished runs in ``path``, one JSON object per line, each with a ``"key"``.

    ``key_of(settings)`` is the canonical key of a run's settings (sorted JSON). ``add``
    rewrites the whole file atomically, so an interrupted experiment never leaves half a line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                self.done[record["key"]] = record

    @staticmethod
    def key_of(settings: dict[str, Any]) -> str:
        """The canonical key of a run's settings."""
        return json.dumps(settings, sort_keys=True)

    def get(self, key: str) -> dict[str, Any] | None:
        """The finished run with this key, or None."""
        return self.done.get(key)

    def add(self, record: dict[str, Any]) -> None:
        """Record a finished run (it must carry its ``"key"``)."""
        self.done[record["key"]] = record
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.done.values()))
