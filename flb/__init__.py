"""flower-large-batch from Python: run, sweep, load, summarise and plot experiments.

>>> import flb
>>> s = flb.sweep({"teacher": ["none", "adascale"]}, seeds=[1, 2, 3], base={"num-server-rounds": 20})
>>> flb.summarize(s.rounds(), by="teacher")

``run`` and ``sweep`` train with the real ServerApp and ClientApp (in this process, or through
``flwr run`` with ``engine="ray"``) and cache every run by its config; ``load`` reads any
results folders. See docs/python-api.md.
"""

from importlib import import_module

_EXPORTS = {"load": "flb.analysis", "plot": "flb.analysis", "summarize": "flb.analysis",
            "time_to_accuracy": "flb.analysis",
            "Run": "flb.runs", "Sweep": "flb.runs", "expand": "flb.runs", "run": "flb.runs", "sweep": "flb.runs"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import on first use: ``python -m flb.launch`` needs none of pandas or the runtime."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flb' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
