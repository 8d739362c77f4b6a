"""Tail averaging (``average-from``): the run's model is the mean of the global models of its last rounds.

Stochastic weight averaging (Izmailov, Podoprikhin, Garipov, Vetrov & Wilson 2018, "Averaging
Weights Leads to Wider Optima and Better Generalization") averages the iterates of SGD at a
constant or cyclic learning rate and reports better test accuracy than the last iterate at no
extra gradient. Here the server adds the global model after every round r > a to a running mean
(``running_mean``, strategies/server_opt.py); training goes on from the last model, and the mean
is what central evaluation scores and what ``model.pt`` holds. A skipped round (no step) adds
nothing. Float tensors are averaged, BatchNorm's running statistics with them (Izmailov et al.
recompute them with one pass over the data instead; a model without BatchNorm is unaffected);
integer buffers such as ``num_batches_tracked`` take the last model's value. The mean lives in
``ServerState``, so a resumed run continues it.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from strategies.server_opt import running_mean
from strategies.server_state import ServerState
from workloads.config import RunConfig
from workloads.errors import ConfigError


def average_start(cfg: RunConfig) -> int:
    """a, the last round not averaged: ``average-from`` as rounds (a fraction of ``num-server-rounds`` below 1); 0 = off.

    Raises
    ------
    ConfigError
        If no round would be left to average (a >= ``num-server-rounds``).
    """
    f, n = cfg.average_from, cfg.num_server_rounds
    if f == 0:
        return 0
    a = int(round(f * n)) if f < 1 else int(f)
    if not 0 <= a < n:
        raise ConfigError(
            f"run-config key 'average-from' = {f:g} gives round {a} of num-server-rounds = {n}: no round would be "
            f"averaged. Allowed: a fraction in (0, 1) or a round count 1..{n - 1} (or 0, off).")
    return a


def with_average(state: ServerState, cfg: RunConfig) -> ServerState:
    """``state`` after a step of round ``state.round``, its model added to the tail mean when the round is past a."""
    a = average_start(cfg)
    if not cfg.average_from or state.round <= a:
        return state
    count = state.averaged + 1
    names = [k for k, v in state.model.items() if v.is_floating_point()]
    previous = None if state.average is None else [state.average[k] for k in names]
    mean = OrderedDict(state.model)
    mean.update(zip(names, running_mean(previous, [state.model[k] for k in names], count)))
    return dataclasses.replace(state, average=mean, averaged=count)


def delivered_model(state: ServerState) -> OrderedDict:
    """The model the run delivers: the tail mean once it has a model, else the last global model."""
    return state.model if state.average is None else state.average
