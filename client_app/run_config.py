"""The ClientApp's run config: parsed once per process for each run, not per message.

Every message handler (``train``, ``query``, ``identify`` and the bundles of virtual clients,
whose inner clients are messages too) needs the run's ``RunConfig`` and, for memory budgets,
its device profiles. ``client_run(context)`` parses ``context.run_config`` the first time a
process sees that run with that config and returns the same ``ClientRun`` afterwards. The cache
key is the run id and the config's contents (every key, value and value type), so a SuperNode
process that serves another run, or the same run id with a different config, parses again.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict

from flwr.app import Context

from workloads.config import RunConfig
from workloads.devices import DeviceProfile, parse_profiles

CACHE_SIZE = 16  # runs (or configs of a run) a process keeps parsed


class ClientRun:
    """One run's parsed config in this process."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    @functools.cached_property
    def profiles(self) -> tuple[DeviceProfile, ...]:
        """``device-profiles`` parsed, on first use (raises ConfigError on a bad entry, every time it is asked)."""
        return parse_profiles(self.cfg.device_profiles)


_CACHE: OrderedDict[tuple, ClientRun] = OrderedDict()
_LOCK = threading.Lock()


def client_run(context: Context) -> ClientRun:
    """The parsed run config of ``context``'s run (cached per run id and config contents).

    Raises
    ------
    ConfigError
        As ``RunConfig.from_mapping(context.run_config)``; a config that fails is parsed again next time.
    """
    try:  # value types are part of the key: 1 == True == 1.0 as values, but they parse differently
        key = (context.run_id, frozenset((k, type(v), v) for k, v in context.run_config.items()))
    except TypeError:  # an unhashable value (not a Flower config value): parse without the cache
        return ClientRun(RunConfig.from_mapping(context.run_config))
    with _LOCK:
        run = _CACHE.get(key)
        if run is not None:
            _CACHE.move_to_end(key)
            return run
    run = ClientRun(RunConfig.from_mapping(context.run_config))  # outside the lock: clients of a bundle run in threads
    with _LOCK:
        run = _CACHE.setdefault(key, run)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return run
