"""The time-to-accuracy study's setting and its batch methods (experiments/time_to_accuracy.py).

Every method sees the same ``EPOCHS`` epochs of ``TRAIN_LIMIT`` images; what differs is the
global batch B_r of each round, the learning-rate schedule and, for ``post-local``, who takes
the steps (the module docstring of experiments/time_to_accuracy.py describes each method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DATASET, MODEL, TRAIN_LIMIT, EPOCHS = "cifar10", "cnn", 5000, 40
SMALL, LARGE, CLIENTS = 32, 512, 8  # CLIENTS: the clients whose spread measures B_simple (batch-noise)
WARMUP_FRAC, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
EVAL_EPOCHS = 2  # validation accuracy every this many epochs (and at the end)
LOCAL_CLIENTS = 16  # post-local's local phase: 16 clients of LARGE / 16 = 32 examples a step (small's batch)
# small and large: the gap search's validation choice (gap_search_runs.jsonl, seed 0)
CHOSEN_LR = {"small": 0.0125, "large": 0.05}
TUNE_LRS = (0.0125, 0.025, 0.05)
SEEDS = (1, 2, 3, 4, 5)
TARGET_MARGIN = 0.005  # the target is small batch's final validation accuracy less 0.5 pp


@dataclass(frozen=True)
class Method:
    """A batch method: the schedule of B_r and of the learning rate."""

    name: str
    schedule: str  # lr after warm-up: cosine or constant
    batch: int = 0  # fixed B; 0 = a schedule (steps, or the noise rule)
    steps: tuple[int, ...] = ()  # a step schedule: one B per equal share of the epochs
    settle: bool = False  # noise rule: B_simple measured during the lr warm-up is not used
    ratchet: bool = True  # noise rule: B never shrinks (False: B_r = the clamped EMA, up or down)
    moments: bool = False  # noise rule: tr(Sigma) and |mu|^2 averaged apart (the product's rule), else B_simple
    local_steps: int = 0  # post-local: H local steps a round after the switch (0: every round is one step)
    switch: float = 0.5  # post-local: the share of the epochs in large-batch rounds before the local phase
    local_clients: int = LOCAL_CLIENTS  # local rounds: the clients that share each step's batch
    # local rounds: True, the clients continue the server's momentum and send weights and velocity
    # (post-local); False, plain local SGD and the server's momentum on the mean pseudo-gradient (FedAvgM)
    local_momentum: bool = True
    # local_momentum rounds: True, the clients send their velocity; False, weights only and the server
    # rebuilds the mean velocity from them (strategies/server_opt.py velocity_from_weights)
    send_velocity: bool = True
    phase_steps: tuple[int, ...] = ()  # local rounds of a step schedule: H per phase of ``steps`` (default local_steps)
    # tail averaging (SWA, Izmailov et al. 2018): once this share of the epochs is seen, the model evaluated
    # is the running mean of the global weights after each later round (0: no averaging)
    average_from: float = 0.0


STEP_BATCHES = (64, 128, 256, 512)  # batch-step: one per quarter of the epochs
METHODS = {m.name: m for m in (
    Method("small", "cosine", SMALL), Method("large", "cosine", LARGE),
    Method("batch-step", "constant", steps=STEP_BATCHES), Method("batch-step-cosine", "cosine", steps=STEP_BATCHES),
    Method("batch-noise", "constant"), Method("batch-step-128", "constant", steps=(128, 256, 512, 1024)),
    # 64 and 128 for 5 epochs each, then 256 and 512 for 15: the first jump at epoch 5 rather than 10
    Method("batch-step-fast", "constant", steps=(64, 128, 256, 256, 256, 512, 512, 512)),
    Method("batch-noise-warm", "constant", settle=True),
    Method("batch-noise-follow", "constant", settle=True, ratchet=False),
    Method("batch-noise-moments", "constant", settle=True, moments=True),
    # Lin et al. 2020 with the product's defaults (teacher-switch 0.5, teacher-local-steps 16)
    Method("post-local", "cosine", LARGE, local_steps=16),
    # local SGD from the first round (switch 0): FedAvg's rounds on the same 16 clients of 32
    Method("local-sgd", "cosine", LARGE, local_steps=16, switch=0.0),
    # batch-step's steps (the same batches in the same order) taken as local rounds of H = 8 steps on
    # 8 clients, each step's batch split over them (8 to 64 examples a client)
    Method("batch-step-local", "constant", steps=STEP_BATCHES, local_steps=8, switch=0.0, local_clients=CLIENTS),
    # the same with rounds of H = 4 and H = 2 steps (368 and 735 rounds)
    Method("batch-step-local-4", "constant", steps=STEP_BATCHES, local_steps=4, switch=0.0, local_clients=CLIENTS),
    Method("batch-step-local-2", "constant", steps=STEP_BATCHES, local_steps=2, switch=0.0, local_clients=CLIENTS),
    # rounds of 2 plain SGD steps on each client, the server's momentum on the mean pseudo-gradient
    # (FedAvgM, Hsu et al. 2019; the product's local-steps = 2): clients send weights only
    Method("batch-step-fedavgm-2", "constant", steps=STEP_BATCHES, local_steps=2, switch=0.0, local_clients=CLIENTS,
           local_momentum=False),
    # batch-step-local-2's rounds, but the clients send weights only and the server rebuilds the mean
    # velocity from them (the product's teacher-velocity = "from-weights")
    Method("batch-step-local-2-weights", "constant", steps=STEP_BATCHES, local_steps=2, switch=0.0,
           local_clients=CLIENTS, send_velocity=False),
    # the same, but H = 2 only while B <= 128 and single steps after (AdaComm's shrinking period, Wang & Joshi 2019)
    Method("batch-step-adacomm", "constant", steps=STEP_BATCHES, local_steps=2, switch=0.0, local_clients=CLIENTS,
           send_velocity=False, phase_steps=(2, 2, 1, 1)),
    # batch-step-local-2-weights, evaluated on the mean of the global weights over the last phase (B = 512)
    Method("batch-step-local-2-swa", "constant", steps=STEP_BATCHES, local_steps=2, switch=0.0,
           local_clients=CLIENTS, send_velocity=False, average_from=0.75))}


def step_schedule(n: int, batches: tuple[int, ...] = STEP_BATCHES) -> tuple[list[tuple[int, float]], int]:
    """A step schedule's ``batch-steps`` as (rounds completed, multiplier of batches[0]) and its rounds."""
    steps, rounds = [], 0
    share = EPOCHS * n // len(batches)
    for b in batches:
        steps.append((rounds, b / batches[0]))
        rounds += math.ceil(share / b)
    return steps, rounds


def local_rounds(method: Method, n: int) -> list[tuple[int, int]]:
    """A step schedule taken in local rounds: (B of each step, H) per round; a phase's last round takes the rest."""
    plan, share = [], EPOCHS * n // len(method.steps)
    for i, b in enumerate(method.steps):
        left, h = math.ceil(share / b), method.phase_steps[i] if method.phase_steps else method.local_steps
        while left:
            plan.append((b, min(h, left)))
            left -= plan[-1][1]
    return plan


def local_phase(method: Method, n: int) -> tuple[int, int]:
    """post-local: the large-batch rounds s (``switch`` of the epochs at LARGE) and the local phase's steps."""
    s = math.ceil(method.switch * EPOCHS * n / LARGE)
    return s, math.ceil(max(0, EPOCHS * n - s * LARGE) / LARGE)


def planned_steps(method: Method, n: int) -> int:
    """Sequential steps, the learning rate's clock: the rounds, but post-local's local rounds take H steps."""
    if method.local_steps and method.steps:
        return step_schedule(n, method.steps)[1]
    if method.local_steps:
        return sum(local_phase(method, n))
    return planned_rounds(method, n)


def planned_rounds(method: Method, n: int) -> int:
    """Rounds of a method with a known schedule (for warm-up and cosine); batch-noise: small's."""
    if method.local_steps and method.steps:
        return len(local_rounds(method, n))
    if method.local_steps:
        s, local = local_phase(method, n)
        return s + math.ceil(local / method.local_steps)
    if method.batch:
        return math.ceil(EPOCHS * n / method.batch)
    if method.steps:
        return step_schedule(n, method.steps)[1]
    return math.ceil(EPOCHS * n / SMALL)  # batch-noise: warm-up as small batch's (constant lr after it)

