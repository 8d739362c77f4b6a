"""Device profiles: the memory, speed and network link of simulated (or real) clients.

A profile string lists profiles separated by commas, each ``name:memory_mb[:speed
[:bandwidth_mbps[:latency_ms]]]``, e.g. ``"phone:256:0.25:20:60,laptop:2048:1:100:20"``.
In simulation, partition ``i`` gets profile ``i mod len(profiles)`` (deterministic). On a real
SuperNode ``--node-config "memory-budget-mb=..."`` gives the budget instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from workloads.errors import ConfigError

MIB = 2**20


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of client device."""

    name: str
    memory_mb: float  # memory for a training step, MiB; 0 = unlimited
    speed: float = 1.0  # compute speed relative to the machine the simulation runs on
    bandwidth_mbps: float = 100.0  # link bandwidth each way, megabits per second
    latency_ms: float = 20.0  # one-way link latency, milliseconds


def parse_profiles(text: str) -> tuple[DeviceProfile, ...]:
    """Parse the run-config key ``device-profiles`` ("" gives no profiles).

    Raises
    ------
    ConfigError
        Naming the offending entry and the expected form.
    """
    profiles = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        parts = entry.split(":")
        try:
            if not 2 <= len(parts) <= 5 or not parts[0]:
                raise ValueError
            numbers = [float(x) for x in parts[1:]]
            profile = DeviceProfile(parts[0], *numbers)
            if profile.memory_mb < 0 or min(numbers[1:], default=1) <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"run-config key 'device-profiles' entry {entry!r} is invalid. Allowed: "
                "name:memory_mb[:speed[:bandwidth_mbps[:latency_ms]]] with memory_mb >= 0 (0 = "
                "unlimited) and the rest > 0, e.g. \"phone:256:0.25:20:60,laptop:2048\"."
            ) from None
        profiles.append(profile)
    return tuple(profiles)


def profile_for(profiles: tuple[DeviceProfile, ...], partition_id: int) -> DeviceProfile | None:
    """The profile of a partition in simulation (``None`` without profiles)."""
    return profiles[partition_id % len(profiles)] if profiles else None


def memory_budget_mb(
    node_config: Mapping[str, object], profiles: tuple[DeviceProfile, ...], default_mb: float, partition_id: int
) -> tuple[float, str]:
    """A client's memory budget (MiB, 0 = unlimited) and where it came from.

    In this order: the SuperNode's ``--node-config "memory-budget-mb=..."``, the device profile
    of the partition in simulation, the run-config key ``memory-budget-mb``.

    Raises
    ------
    ConfigError
        If the node config's value is not a number >= 0.
    """
    if "memory-budget-mb" in node_config:
        value = node_config["memory-budget-mb"]
        try:
            budget = float(value)  # type: ignore[arg-type]
            if not budget >= 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(
                f"node-config key 'memory-budget-mb' = {value!r} is invalid. Allowed: a number of MiB >= 0 (0 = unlimited)."
            ) from None
        return budget, "node-config key 'memory-budget-mb'"
    profile = profile_for(profiles, partition_id)
    if profile is not None:
        return profile.memory_mb, f"run-config key 'device-profiles' entry {profile.name!r}"
    return default_mb, "run-config key 'memory-budget-mb'"
