"""experiments/dp_accuracy.py's arms, shrunk to a few rounds: DP meets its epsilon target, no DP has none."""

from __future__ import annotations

import math

import pytest

from experiments import dp_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_dp_arm_meets_its_target_and_the_plain_arm_is_not_private(tmp_path, monkeypatch):
    monkeypatch.setattr(dp_accuracy, "BASE", dp_accuracy.BASE | {
        "virtual-clients": 8, "clients-per-round": 4, "global-batch-size": 32, "num-server-rounds": 3,
        "eval-every": 3})
    private = dp_accuracy.run_arm(8.0, 1, tmp_path)
    assert 7.5 < private["dp_epsilon"] <= 8.0  # the chosen z spends almost all of the target, never more
    assert private["z"] > 0 and 0.0 <= private["test_accuracy"] <= 1.0
    plain = dp_accuracy.run_arm(0.0, 1, tmp_path)
    assert math.isinf(plain["dp_epsilon"]) and plain["z"] == 0.0
