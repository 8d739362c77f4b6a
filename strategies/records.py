"""Where a strategy's per-round records go: a protocol, and an in-memory sink.

The ServerApp's sink is ``server_app.results.RunResults``, which owns the results format
(rounds.csv, clients.csv, failures.csv, batch_plan.json).
"""

from __future__ import annotations

from typing import Any, Protocol


class RoundSink(Protocol):
    """Where the strategy's per-round records go (server_app.results.RunResults)."""

    def train(self, row: dict[str, Any], clients: list[dict[str, Any]]) -> None: ...  # noqa: D102
    def failures(self, rows: list[dict[str, Any]]) -> None: ...  # noqa: D102
    def plan(self, batch_plan: dict[str, Any]) -> None: ...  # noqa: D102


class MemorySink:
    """A ``RoundSink`` that keeps the records in lists (tests, notebooks)."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []
        self.failure_rows: list[dict[str, Any]] = []
        self.batch_plan: dict[str, Any] = {}

    def train(self, row: dict[str, Any], clients: list[dict[str, Any]]) -> None:  # noqa: D102
        self.rounds.append(row)
        self.clients += clients

    def failures(self, rows: list[dict[str, Any]]) -> None:  # noqa: D102
        self.failure_rows += rows

    def plan(self, batch_plan: dict[str, Any]) -> None:  # noqa: D102
        self.batch_plan = batch_plan
