"""The routing reward of the MetaLLM paper, with real per-query cost.

>>> reward(correct=True, cost_usd=0.0005, lam=0.1, cost_unit=0.001)
0.95
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardSettings:
    """λ and the cost unit it applies per (λ may move in budget mode: see LivePolicy)."""

    lam: float
    cost_unit: float


def reward(correct: bool, cost_usd: float, lam: float, cost_unit: float) -> float:
    """r = 1[correct] − λ · cost / cost_unit. A failed or unparseable call counts as wrong."""
    if cost_unit <= 0:
        raise ValueError("cost_unit must be positive")
    return float(bool(correct)) - lam * cost_usd / cost_unit
