"""Synthetic streams with a known change, for measuring how fast a router follows drift.

Three arms, each right with a fixed probability at a fixed cost per call; at ``change_at`` the
best arm (``strong``) either drops in accuracy (``kind="accuracy"``: 0.90 → 0.60) or gets ten
times dearer (``kind="price"``). At λ = 0.1 and a $0.001 cost unit its reward goes from 0.85
(the best) to 0.55 or 0.40, below ``mid``'s 0.74: a router that follows should move its
queries to ``mid``. The contexts are a bias and a few coordinates of noise (the context does
not help here).

    >>> problem = drift_problem(200, 100, "price", seed=0)
    >>> problem.arms, float(problem.cost[99, 0]), float(problem.cost[100, 0])
    (['strong', 'mid', 'cheap'], 0.0005, 0.005)
    >>> round(float(problem.correct[:100, 0].mean()), 2)
    0.86
"""

from __future__ import annotations

import numpy as np

from evaluation.bench import Problem
from service.outcomes import ArmOutcome, OutcomeRecord

#: (accuracy, cost per call in USD) of each arm before the change
ARMS = {"strong": (0.90, 0.0005), "mid": (0.75, 0.0001), "cheap": (0.55, 0.00002)}
DROPPED_ACCURACY = 0.60
PRICE_FACTOR = 10.0


def drift_problem(n: int, change_at: int, kind: str, seed: int = 0, noise_dims: int = 4) -> Problem:
    """A stream of ``n`` queries whose ``strong`` arm changes at query ``change_at`` (``kind``
    "accuracy" or "price"; module doc)."""
    if kind not in ("accuracy", "price"):
        raise ValueError(f"kind is 'accuracy' or 'price', not {kind!r}")
    rng = np.random.default_rng(seed)
    records = []
    for t in range(n):
        arms = {}
        for arm, (accuracy, cost) in ARMS.items():
            if arm == "strong" and t >= change_at:
                if kind == "accuracy":
                    accuracy = DROPPED_ACCURACY
                else:
                    cost = cost * PRICE_FACTOR
            right = bool(rng.random() < accuracy)
            arms[arm] = ArmOutcome(prediction="yes" if right else "no", cost_usd=cost)
        records.append(OutcomeRecord(query_id=f"q{t}", text="a query", label="yes", arms=arms))
    contexts = np.hstack([np.ones((n, 1)), rng.normal(0.0, 0.5, (n, noise_dims))])
    return Problem.from_records(records, contexts.astype(np.float32))


def queries_to_halve(
    choices: np.ndarray, arm: int, change_at: int, window: int = 100
) -> int | None:
    """Queries after ``change_at`` until ``arm``'s share over the last ``window`` queries is
    at most half its share over the ``window·5`` queries before the change (None: never).

    >>> choices = np.array([0] * 600 + [1] * 200)
    >>> queries_to_halve(choices, 0, 600)
    50
    """
    before = float(np.mean(choices[max(0, change_at - 5 * window) : change_at] == arm))
    hits = (choices == arm).astype(float)
    for t in range(change_at + 1, len(choices) + 1):
        if np.mean(hits[max(0, t - window) : t]) <= before / 2:
            return t - change_at
    return None
