"""Metric functions against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.metrics import (
    Point,
    accuracy,
    aiq,
    apgr,
    cost_at_accuracy,
    cost_share,
    mean_and_spread,
    oracle_choices,
    regret,
    upper_hull,
)

CHEAP, BEST = Point(1.0, 0.6), Point(11.0, 0.8)  # x = (cost-1)/10, PGR = (acc-0.6)/0.2


def test_accuracy_cost_share_and_regret() -> None:
    assert accuracy([True, True, False, False, True]) == 0.6
    with pytest.raises(ValueError):
        accuracy([])
    assert cost_share(0.3, 1.2) == pytest.approx(25.0)
    assert math.isnan(cost_share(1.0, 0.0))
    # oracle rewards (1, 0.95, 0) against (1, 0, -0.5): 0 + 0.95 + 0.5
    assert regret(np.array([1.0, 0.95, 0.0]), np.array([1.0, 0.0, -0.5])) == pytest.approx(1.45)


def test_oracle_picks_the_best_reward_then_the_cheaper_arm() -> None:
    rewards = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.2, 0.9, 0.9], [1.0, 0.5, 0.0]])
    costs = np.array([[3.0, 1.0, 2.0], [3.0, 2.0, 1.0], [1.0, 2.0, 2.0], [3.0, 2.0, 1.0]])
    assert oracle_choices(rewards, costs).tolist() == [1, 2, 1, 0]


def test_apgr_by_hand() -> None:
    # the line from the cheapest to the best arm (random mixing): 0.5
    assert apgr([Point(6.0, 0.7), BEST], CHEAP, BEST) == pytest.approx(0.5)
    # best accuracy at 20 % of the extra cost: triangle 0.2·1/2 + rectangle 0.8·1 = 0.9
    assert apgr([Point(3.0, 0.8)], CHEAP, BEST) == pytest.approx(0.9)
    # one point half way at PGR 0.5, then flat: 0.5·0.5/2 + 0.5·0.5 = 0.375
    assert apgr([Point(6.0, 0.7)], CHEAP, BEST) == pytest.approx(0.375)
    # points: x=0.4 PGR 0.6, x=0.8 PGR 0.9 → 0.4·0.6/2 + 0.4·(0.6+0.9)/2 + 0.2·0.9 = 0.6
    assert apgr([Point(5.0, 0.72), Point(9.0, 0.78)], CHEAP, BEST) == pytest.approx(0.6)
    # a point beyond the best arm's cost is interpolated to x = 1: (0.5,0.5)→(1.5,1.5) gives
    # PGR 1.0 at x = 1: 0.125 + 0.5·(0.5+1)/2 = 0.5
    assert apgr([Point(6.0, 0.7), Point(16.0, 0.9)], CHEAP, BEST) == pytest.approx(0.5)
    # order of the points does not matter; nothing to recover when the best arm is cheapest
    assert apgr([Point(9.0, 0.78), Point(5.0, 0.72)], CHEAP, BEST) == pytest.approx(0.6)
    assert math.isnan(apgr([Point(1.0, 0.6)], Point(1.0, 0.8), Point(1.0, 0.8)))


def test_upper_hull_is_concave_and_non_decreasing() -> None:
    points = [Point(0, 0.5), Point(1, 0.55), Point(2, 0.9), Point(3, 0.8), Point(2, 0.7)]
    assert [(p.cost, p.accuracy) for p in upper_hull(points)] == [(0, 0.5), (2, 0.9)]
    points = [Point(0, 0.5), Point(1, 0.8), Point(2, 0.9), Point(4, 0.95)]
    assert [(p.cost, p.accuracy) for p in upper_hull(points)] == [
        (0, 0.5),
        (1, 0.8),
        (2, 0.9),
        (4, 0.95),
    ]
    assert upper_hull([]) == []


def test_aiq_by_hand() -> None:
    # hull (0, .5) → (1, .7) then flat to 2: (0.6·1 + 0.7·1) / 2
    assert aiq([Point(0.0, 0.5), Point(1.0, 0.7)], 0.0, 2.0) == pytest.approx(0.65)
    # a point under the hull does not count; the anchor starts the curve
    curve = [Point(2.0, 0.8), Point(3.0, 0.7)]
    # hull (1, .6) → (2, .8), flat to 5: (0.7·1 + 0.8·3) / 4
    assert aiq(curve, 1.0, 5.0, anchor=Point(1.0, 0.6)) == pytest.approx(0.775)


def test_cost_at_accuracy_measured_and_interpolated() -> None:
    curve = [Point(2.0, 0.6), Point(4.0, 0.8), Point(3.0, 0.79), Point(10.0, 0.85)]
    assert cost_at_accuracy(curve, 0.8) == 4.0
    assert cost_at_accuracy(curve, 0.79) == 3.0
    assert cost_at_accuracy(curve, 0.9) is None
    # hull: (2,.6) → (3,.79) → (4,.8) …: 0.7 is reached at 2 + (0.1/0.19)·1
    assert cost_at_accuracy(curve, 0.7, interpolate=True) == pytest.approx(2 + 0.1 / 0.19)
    assert cost_at_accuracy(curve, 0.5, interpolate=True) == 2.0
    assert cost_at_accuracy(curve, 0.9, interpolate=True) is None


def test_mean_and_spread() -> None:
    assert mean_and_spread([2.0]) == {"mean": 2.0, "std": 0.0, "min": 2.0, "max": 2.0}
    s = mean_and_spread([1.0, 2.0, 3.0, 6.0])
    assert s["mean"] == 3.0 and s["std"] == pytest.approx(math.sqrt(14 / 3))
