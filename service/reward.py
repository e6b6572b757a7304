"""Scoring: the routing reward of the MetaLLM paper, with real per-query cost, and how a label
scores a decision.

>>> reward(correct=True, cost_usd=0.0005, lam=0.1, cost_unit=0.001)
0.95
>>> scored = score_label(FoundDecision.example(prediction="Positive"), " positive", None,
...                      RewardSettings(lam=0.1, cost_unit=0.001))
>>> scored.correct, scored.reward, scored.lam
(True, 0.99, 0.1)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.log.rows import FoundDecision, ScoredLabel


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


def labels_match(prediction: str | None, label: str) -> bool:
    """A prediction is correct when it equals the label, ignoring case and surrounding space."""
    return prediction is not None and prediction.strip().casefold() == label.strip().casefold()


def failure_reward(settings: RewardSettings) -> float:
    """The reward of a call whose arm failed: wrong, at no cost (a failed request returns no
    usage)."""
    return reward(False, 0.0, settings.lam, settings.cost_unit)


def score_label(
    decision: FoundDecision,
    label: str,
    labeled_at: datetime | None,
    settings: RewardSettings,
    duplicates: int = 0,
) -> ScoredLabel:
    """Score a decision against its label. A failed or unparseable call is wrong (and still
    pays its cost). A decision rewarded at decision time (its arm failed) only gets its
    label: no second policy update; so does one whose arm refused the prompt as longer than
    its context window (``input_too_long``): that says nothing of the arm."""
    correct = decision.status == "ok" and labels_match(decision.prediction, label)
    if decision.reward_seq is not None or decision.status == "input_too_long":
        return ScoredLabel(decision, label, labeled_at, correct, extra_duplicates=duplicates)
    r = reward(correct, decision.cost_usd, settings.lam, settings.cost_unit)
    return ScoredLabel(decision, label, labeled_at, correct, r, settings.lam, duplicates)
