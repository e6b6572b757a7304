"""Drift on a short synthetic stream: with ``drift`` on (the default), the default policy moves
off an arm whose accuracy dropped, or whose price went up tenfold, within a stated number of
queries; with it off it does not; and the detector's state survives a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.bench import simulate
from evaluation.synthetic import drift_problem, queries_to_halve
from service.policy import loads, make_policy

N, CHANGE_AT, DELAY = 1500, 700, 20


def halving(kind: str, drift: float, seed: int = 0) -> int | None:
    problem = drift_problem(N, CHANGE_AT, kind, seed)
    policy = make_policy("correctness_ucb", epsilon=0.02, seed=seed, drift=drift)
    result = simulate(problem, policy, 0, DELAY, 0.1, 0.001)
    assert np.mean(result.choices[CHANGE_AT - 300 : CHANGE_AT] == 0) > 0.8  # it served
    return queries_to_halve(result.choices, 0, CHANGE_AT)


@pytest.mark.parametrize("kind", ["accuracy", "price"])
def test_drift_on_moves_off_the_changed_arm_and_off_does_not(kind):
    on, off = halving(kind, 10.0), halving(kind, 0.0)
    assert on is not None and on <= 300, on
    assert off is None or off > 2 * on, (on, off)


def test_the_detector_is_checkpointed_with_the_policy():
    problem = drift_problem(400, 200, "accuracy", seed=1)
    policy = make_policy("correctness_ucb", seed=1)  # drift on by default
    simulate(problem, policy, 0, 0, 0.1, 0.001)
    restored = loads(policy.dumps())
    assert policy.detector.alarms >= 1
    assert restored.detector.to_dict() == policy.detector.to_dict()
    assert restored.cost_halflife == policy.cost_halflife == 100.0


def test_a_merge_keeps_the_first_policys_detector():
    first = make_policy("correctness_ucb", seed=1)
    simulate(drift_problem(400, 200, "accuracy", seed=1), first, 0, 0, 0.1, 0.001)
    second = make_policy("correctness_ucb", seed=2)
    simulate(drift_problem(100, 100, "accuracy", seed=2), second, 0, 0, 0.1, 0.001)
    assert first.merge(second).detector.to_dict() == first.detector.to_dict()
