"""Routing metrics: per-method figures and the summaries of an accuracy–cost curve.

Per method (over the same stream of queries): accuracy, total cost, cost as a share of a
reference arm, and regret against the per-query oracle.

Curve summaries, from the (total cost, accuracy) points of a λ sweep:

* :func:`apgr` — *average performance gap recovered* (RouteLLM, Ong et al. 2024): the area under
  the curve of ``PGR = (acc − acc_cheap) / (acc_best − acc_cheap)`` against the cost normalised
  to ``(cost − cost_cheap) / (cost_best − cost_cheap)`` on [0, 1]. With two arms and equal
  per-call costs the x-axis is RouteLLM's "% of calls to the strong model". 0.5 is what random
  mixing of the two arms gets; 1.0 means the best arm's accuracy at the cheapest arm's cost.
* :func:`aiq` — *average improvement in quality* (RouterBench, Hu et al. 2024): the mean
  accuracy of the router's non-decreasing convex hull over the cost range ``[c_min, c_max]``.
* :func:`cost_at_accuracy` — the lowest cost at which the curve reaches a target accuracy
  (e.g. 95 % of the best arm's).

The curve always starts at the cheapest arm (a router can always send everything there) and
beyond its most expensive point it stays flat (a budget need not be spent).

    >>> cheap, best = Point(1.0, 0.6), Point(11.0, 0.8)
    >>> apgr([Point(6.0, 0.7), Point(11.0, 0.8)], cheap, best)   # the random-mixing line
    0.5
    >>> apgr([Point(3.0, 0.8)], cheap, best)          # best accuracy at 20 % of the extra cost
    0.9
    >>> cost_at_accuracy([Point(3.0, 0.75), Point(6.0, 0.8)], 0.76)
    6.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Point:
    """One configuration of a router: total cost (USD) and accuracy in [0, 1]."""

    cost: float
    accuracy: float


# ------------------------------------------------------------------------------ per method
def accuracy(correct: Sequence[bool] | np.ndarray) -> float:
    """Fraction of correct answers.

    >>> accuracy([True, False, True, True])
    0.75
    """
    values = np.asarray(correct, dtype=bool)
    if values.size == 0:
        raise ValueError("accuracy of an empty stream")
    return float(values.mean())


def cost_share(total_cost: float, reference_cost: float) -> float:
    """``total_cost`` as a percentage of ``reference_cost``.

    >>> cost_share(0.25, 1.0)
    25.0
    """
    if reference_cost <= 0:
        return math.nan
    return 100.0 * total_cost / reference_cost


def oracle_choices(rewards: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Per query, the arm with the highest reward; ties go to the cheaper arm, then the first.

    ``rewards`` and ``costs`` have shape (n, k).

    >>> r = np.array([[1.0, 0.9], [0.0, 0.0], [0.0, 0.9]])
    >>> c = np.array([[2.0, 1.0], [2.0, 1.0], [2.0, 1.0]])
    >>> oracle_choices(r, c).tolist()
    [0, 1, 1]
    """
    rewards, costs = np.asarray(rewards, dtype=float), np.asarray(costs, dtype=float)
    best = rewards == rewards.max(axis=1, keepdims=True)
    masked = np.where(best, costs, np.inf)
    return masked.argmin(axis=1)


def regret(oracle_rewards: np.ndarray, method_rewards: np.ndarray) -> float:
    """Cumulative regret: ``Σ_t (oracle reward − method reward)``.

    >>> regret(np.array([1.0, 0.9, 1.0]), np.array([1.0, 0.0, 0.5]))
    1.4
    """
    return round(float(np.sum(np.asarray(oracle_rewards) - np.asarray(method_rewards))), 12)


# ------------------------------------------------------------------------------ curves
def _sorted(points: Sequence[Point]) -> list[Point]:
    clean = [p for p in points if math.isfinite(p.cost) and math.isfinite(p.accuracy)]
    return sorted(clean, key=lambda p: (p.cost, -p.accuracy))


def upper_hull(points: Sequence[Point]) -> list[Point]:
    """The non-decreasing concave upper envelope of ``points``, sorted by cost.

    Any point on it is reachable by randomising between two configurations; it stops rising
    at the most accurate point.

    >>> [(p.cost, p.accuracy) for p in upper_hull(
    ...     [Point(0, 0.5), Point(1, 0.55), Point(2, 0.9), Point(3, 0.8)])]
    [(0, 0.5), (2, 0.9)]
    """
    hull: list[Point] = []
    for p in _sorted(points):
        if hull and p.cost == hull[-1].cost:
            continue  # same cost, lower accuracy (sorted that way)
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or below the segment a → p
            cross = (b.cost - a.cost) * (p.accuracy - a.accuracy) - (b.accuracy - a.accuracy) * (
                p.cost - a.cost
            )
            if cross >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    if not hull:
        return hull
    top = max(range(len(hull)), key=lambda i: (hull[i].accuracy, -hull[i].cost))
    return hull[: top + 1]


def _area(xs: np.ndarray, ys: np.ndarray, lo: float, hi: float) -> float:
    """∫_lo^hi of the piecewise-linear curve through (xs, ys), flat beyond its ends."""
    grid = np.unique(np.concatenate([[lo, hi], xs[(xs > lo) & (xs < hi)]]))
    values = np.interp(grid, xs, ys)
    return float(np.sum((grid[1:] - grid[:-1]) * (values[1:] + values[:-1]) / 2.0))


def apgr(curve: Sequence[Point], cheapest: Point, best: Point) -> float:
    """Average performance gap recovered (see the module docstring); ``cheapest`` and ``best``
    are the cheapest and the most accurate single arm on the same stream.

    The curve is the router's points, in cost order, starting from the cheapest arm, linearly
    interpolated (as RouteLLM's trapezoids) and flat after its last point.
    """
    gap, span = best.accuracy - cheapest.accuracy, best.cost - cheapest.cost
    if gap <= 0 or span <= 0:
        return math.nan  # the best arm is also the cheapest: nothing to recover
    pts = _sorted(curve)
    xs = np.array([0.0] + [(p.cost - cheapest.cost) / span for p in pts])
    ys = np.array([0.0] + [(p.accuracy - cheapest.accuracy) / gap for p in pts])
    order = np.argsort(xs, kind="stable")
    xs, ys = np.maximum(xs[order], 0.0), ys[order]
    return round(_area(xs, ys, 0.0, 1.0), 12)


def aiq(curve: Sequence[Point], c_min: float, c_max: float, anchor: Point | None = None) -> float:
    """Average improvement in quality (RouterBench): the mean accuracy of the non-decreasing
    convex hull of ``curve`` (plus ``anchor``, usually the cheapest arm) over ``[c_min, c_max]``.

    >>> aiq([Point(0.0, 0.5), Point(1.0, 0.7)], 0.0, 2.0)
    0.65
    """
    points = list(curve) + ([anchor] if anchor is not None else [])
    hull = upper_hull(points)
    if not hull or c_max <= c_min:
        return math.nan
    xs = np.array([p.cost for p in hull])
    ys = np.array([p.accuracy for p in hull])
    return round(_area(xs, ys, c_min, c_max) / (c_max - c_min), 12)


def cost_at_accuracy(
    curve: Sequence[Point], target: float, interpolate: bool = False
) -> float | None:
    """The lowest cost at which ``curve`` reaches ``target`` accuracy, or None if it never does.

    By default only measured points count. With ``interpolate`` the curve is its
    non-decreasing convex hull, whose points are reachable by randomising between two measured
    configurations.

    >>> round(cost_at_accuracy([Point(2.0, 0.6), Point(4.0, 0.8)], 0.7, interpolate=True), 9)
    3.0
    >>> cost_at_accuracy([Point(2.0, 0.6)], 0.7) is None
    True
    """
    if not interpolate:
        reached = [p.cost for p in _sorted(curve) if p.accuracy >= target - 1e-12]
        return min(reached) if reached else None
    hull = upper_hull(curve)
    for i, p in enumerate(hull):
        if p.accuracy >= target - 1e-12:
            if i == 0:
                return p.cost
            a = hull[i - 1]
            frac = (target - a.accuracy) / (p.accuracy - a.accuracy)
            return a.cost + frac * (p.cost - a.cost)
    return None


def mean_and_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max.

    >>> mean_and_spread([1.0, 3.0])
    {'mean': 2.0, 'std': 1.4142135623730951, 'min': 1.0, 'max': 3.0}
    """
    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
    }
