"""The venv the suite runs in is the locked one (requirements.lock), package by package.

A drifted transitive package once broke a numeric test far from its cause; this test names the
package instead. Refresh the lock with ``make lock``; rebuild a drifted venv with ``make install``.
"""

from __future__ import annotations

import re
import warnings
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements.lock"
# Installers and this project itself: present in every venv, never in a pip freeze.
NOT_LOCKED = {"pip", "setuptools", "wheel", "flower-large-batch"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` from ``name==version`` lines; comments and blanks skipped."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise ValueError(f"{path.name}:{number}: {line!r} is not of the form name==version")
        pins[_canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    return {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def drift(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """One line per locked package that is missing or at another version."""
    return [f"{name}: locked {want}, installed {have.get(name, 'nothing')}"
            for name, want in sorted(pins.items()) if have.get(name) != want]


def test_the_lock_parses_and_pins_the_direct_requirements():
    pins = read_lock()
    assert len(pins) > 100  # the whole environment, transitive packages included
    for direct in ("torch", "torchvision", "flwr", "flwr-datasets", "ray", "numpy", "scipy", "pandas"):
        assert direct in pins, f"{direct} missing from {LOCK.name}"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_installed_versions_equal_the_lock():
    pins, have = read_lock(), installed()
    problems = drift(pins, have)
    assert not problems, ("the venv differs from requirements.lock (run `make install`, or rebuild: "
                          "rm -rf .venv && make install):\n  " + "\n  ".join(problems))
    extra = sorted(set(have) - set(pins) - NOT_LOCKED)
    if extra:
        warnings.warn(f"installed but not in {LOCK.name} (not tested by CI): {', '.join(extra)}")


def test_drift_names_the_package():
    pins = {"numpy": "2.4.6", "scipy": "1.17.1"}
    assert drift(pins, {"numpy": "2.4.6", "scipy": "1.17.1"}) == []
    assert drift(pins, {"numpy": "2.3.5"}) == ["numpy: locked 2.4.6, installed 2.3.5",
                                               "scipy: locked 1.17.1, installed nothing"]
