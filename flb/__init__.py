"""flower-large-batch from Python: run, sweep, load, summarise and plot experiments.

>>> import flb
>>> s = flb.sweep({"teacher": ["none", "adascale"]}, seeds=[1, 2, 3], base={"num-server-rounds": 20})
>>> flb.summarize(s.rounds(), by="teacher")

``run`` and ``sweep`` train with the real ServerApp and ClientApp (in this process, or through
``flwr run`` with ``engine="ray"``) and cache every run by its config; ``load`` reads any
results folders. See docs/python-api.md.
"""

from flb.analysis import load, plot, summarize
from flb.runs import Run, Sweep, expand, run, sweep

__all__ = ["Run", "Sweep", "expand", "load", "plot", "run", "summarize", "sweep"]
