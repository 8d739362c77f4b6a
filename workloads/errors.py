"""The project's error for bad input: raised before expensive work, naming key, value and what is allowed."""

from __future__ import annotations


class ConfigError(ValueError):
    """A run-config, node-config or command-line value is unknown, of the wrong type or out of range."""


class DataNotFoundError(FileNotFoundError):
    """The dataset is neither in the data folder nor downloadable."""
