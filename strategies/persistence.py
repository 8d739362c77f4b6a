"""Excluding clients whose gradients differ from the majority's the same way round after round.

An attacker that hides inside the honest spread in every single round (ALIE, IPM, sign flip)
has to push the same way in every round to do harm, while two honest clients of an IID
federation differ by fresh noise each round. Summed over n rounds, noise grows like sqrt(n) and
a steady push like n.

Each round, every valid client's gradient is count-sketched to ``SKETCH_DIM`` numbers (the same
random hash in every round) and divided by the round's scale, the median over clients of the
distance to the coordinate-wise median sketch. A second, one-number stream is each sketch's
projection on that median sketch, divided by the projections' median absolute deviation: it
follows attacks that push against the round's gradient (sign flip, IPM), which turns from
round to round. For each stream the server keeps each client's sum S_i and round count n_i,
and for each pair the sum Q_ij of their squared distances over the C_ij rounds they shared. The
pair's persistence is

    rho_ij = |S_i / n_i - S_j / n_j|^2 / (Q_ij / C_ij * (1 / n_i + 1 / n_j) / 2),

the squared distance of their average over what independent noise alone would give: about 1
for two honest clients, growing like n for a steady difference. Two clients agree while
rho_ij <= ``exclude-ratio`` in both streams. A client that has sent ``exclude-after`` rounds and
agrees with itself and no more than half of the active clients (those not excluded, with
``exclude-after`` rounds) is excluded for the rest of the run; never half of all clients seen or
more. With a client in every round, S_i / n_i - S_j / n_j is exactly the pair's average
difference; with partial participation it also holds the drift of the gradients between the
rounds each took part in.

The idea of summing each worker's gradients over time and removing for good the workers whose
sums stray is SafeguardSGD's (Allen-Zhu, Ebrahimian, Li and Alistarh, ICLR 2021,
"Byzantine-Resilient Non-Convex Stochastic Gradient Descent"); the sketch, the per-round scale and
the pairwise majority are ours. Honest clients whose data differ for good (non-IID, or
partitions small enough to be seen many times over) also differ steadily, and can be excluded
(docs/byzantine.md#excluding-persistent-clients).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

SKETCH_DIM = 1024  # count-sketch length: squared distances kept to about sqrt(2 / 1024) = 4.4%
SKETCH_SEED = 20210503  # the hash is fixed: every round, and a resumed run, use the same one
STREAMS = (slice(0, SKETCH_DIM), slice(SKETCH_DIM, SKETCH_DIM + 1))  # the sketch's columns, the projection's


@dataclass(frozen=True)
class Persistence:
    """What ``exclude-ratio`` keeps between rounds (part of ``ServerState``): ``clients`` (partition ids, in
    the order of the rows), S (clients x ``SKETCH_DIM``), n, Q and C (clients x clients), and the excluded."""

    clients: tuple[int, ...] = ()
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(0, SKETCH_DIM + 1, dtype=torch.float64))
    rounds: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    pair_sq: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 0, 0, dtype=torch.float64))
    pair_rounds: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))
    excluded: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        """Plain values for a checkpoint; ``from_dict`` inverts it."""
        return {"clients": list(self.clients), "sums": self.sums, "rounds": self.rounds, "pair_sq": self.pair_sq,
                "pair_rounds": self.pair_rounds, "excluded": list(self.excluded)}

    @classmethod
    def from_dict(cls, state: Mapping | None) -> Persistence:
        """The value ``to_dict`` gave (empty for a checkpoint written before this existed)."""
        if not state:
            return cls()
        return cls(tuple(int(p) for p in state["clients"]), state["sums"], state["rounds"], state["pair_sq"],
                   state["pair_rounds"], tuple(int(p) for p in state["excluded"]))

    def grown(self, partitions: Sequence[int]) -> Persistence:
        """The same record with a zero row (and column) for every partition of ``partitions`` not yet in it."""
        new = [p for p in dict.fromkeys(partitions) if p not in self.clients]
        if not new:
            return self
        k, m = len(self.clients), len(self.clients) + len(new)
        sq, rn = torch.zeros(2, m, m, dtype=torch.float64), torch.zeros(m, m, dtype=torch.float64)
        sq[:, :k, :k], rn[:k, :k] = self.pair_sq, self.pair_rounds
        return Persistence((*self.clients, *new), torch.cat([self.sums, torch.zeros(len(new), SKETCH_DIM + 1,
                                                                                     dtype=torch.float64)]),
                           torch.cat([self.rounds, torch.zeros(len(new), dtype=torch.float64)]), sq, rn,
                           self.excluded)


@functools.lru_cache(maxsize=8)
def _hash(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket and sign of each of ``dim`` coordinates (deterministic: a cache, never state)."""
    gen = torch.Generator().manual_seed(SKETCH_SEED)
    bucket = torch.randint(0, SKETCH_DIM, (dim,), generator=gen)
    return bucket, torch.randint(0, 2, (dim,), generator=gen).to(torch.float64) * 2 - 1


def sketch(vectors: torch.Tensor) -> torch.Tensor:
    """Count sketch of the rows of ``vectors`` (K x D) to K x ``SKETCH_DIM`` (float64); squared lengths and
    distances are kept in expectation."""
    bucket, sign = _hash(vectors.shape[1])
    out = torch.zeros(vectors.shape[0], SKETCH_DIM, dtype=torch.float64)
    return out.index_add_(1, bucket, vectors.to(torch.float64) * sign)


def _features(vectors: torch.Tensor) -> torch.Tensor | None:
    """Each row's sketch over the round's scale, and its projection on the round's coordinate-wise median sketch
    over that projection's median absolute deviation (K x (``SKETCH_DIM`` + 1)); None when the round has no
    spread."""
    s = sketch(vectors)
    center = s.median(dim=0).values
    scale = (s - center).norm(dim=1).median()
    if not float(scale) > 0:
        return None
    proj = torch.zeros(len(vectors), 1, dtype=torch.float64)
    if float(center.norm()) > 0:
        a = s @ (center / center.norm())
        spread = (a - a.median()).abs().median()
        if float(spread) > 0:
            proj[:, 0] = a / spread
    return torch.cat([s / scale, proj], dim=1)


def update(state: Persistence, partitions: Sequence[int], vectors: torch.Tensor, ratio: float,
           after: int) -> Persistence:
    """Add this round's gradients (rows of ``vectors``, one per partition of ``partitions``), then exclude.

    A round with fewer than 3 clients, or no spread among them, adds nothing.
    """
    if len(partitions) < 3 or (x := _features(vectors)) is None:
        return state
    state = state.grown(partitions)
    idx = torch.tensor([state.clients.index(p) for p in partitions])
    sums, rounds = state.sums.clone(), state.rounds.clone()
    sums[idx] += x
    rounds[idx] += 1
    pair_sq, pair_rounds = state.pair_sq.clone(), state.pair_rounds.clone()
    for k, cols in enumerate(STREAMS):
        pair_sq[k][idx[:, None], idx[None, :]] += torch.cdist(x[:, cols], x[:, cols]) ** 2
    pair_rounds[idx[:, None], idx[None, :]] += 1
    state = Persistence(state.clients, sums, rounds, pair_sq, pair_rounds, state.excluded)
    return _exclude(state, ratio, after)


def persistence_ratios(state: Persistence) -> torch.Tensor:
    """rho_ij of every pair of clients, per stream (2 x clients x clients; module docstring); NaN where a
    pair shared no round."""
    inv = 1 / state.rounds.clamp(min=1)
    out = []
    for k, cols in enumerate(STREAMS):
        mean = state.sums[:, cols] / state.rounds.clamp(min=1)[:, None]
        expected = state.pair_sq[k] / state.pair_rounds.clamp(min=1) * (inv[:, None] + inv[None, :]) / 2
        rho = torch.cdist(mean, mean) ** 2 / expected
        rho[state.pair_rounds == 0] = float("nan")
        out.append(rho.fill_diagonal_(0.0))
    return torch.stack(out)


def _exclude(state: Persistence, ratio: float, after: int) -> Persistence:
    """``state`` with the clients the majority disagrees with excluded (module docstring)."""
    active = [i for i, p in enumerate(state.clients) if p not in state.excluded and state.rounds[i] >= after]
    room = (len(state.clients) - 1) // 2 - len(state.excluded)
    if len(active) < 3 or room <= 0:
        return state
    rho = persistence_ratios(state)[:, active][:, :, active].amax(dim=0)  # NaN stays NaN
    agree = (rho <= ratio).sum(dim=1)  # NaN (no shared round) never agrees; a client agrees with itself
    order = sorted(range(len(active)), key=lambda a: (int(agree[a]), -float(rho[a].nan_to_num(0).sum())))
    out = [state.clients[active[a]] for a in order if 2 * int(agree[a]) <= len(active)][:room]
    return state if not out else Persistence(state.clients, state.sums, state.rounds, state.pair_sq,
                                             state.pair_rounds, (*state.excluded, *sorted(out)))
