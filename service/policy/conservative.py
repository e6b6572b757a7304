"""Conservative mode: while it learns, the router never earns much less than the arm a task
runs today (conservative bandits, Wu, Shariff, Lattimore and Szepesvári, NeurIPS 2016).

A task names a ``baseline`` arm and a tolerance ``δ``. Over the task's decisions so far, the
router's cumulative estimated reward must stay at least ``(1 − δ)`` times what the baseline
would have earned on as many queries. Before each decision the policy's choice ``a`` is
checked against a *pessimistic* estimate of that budget; if ``a`` could break it, the
baseline is played instead (with probability 1: that is the logged propensity)::

    Σ_{b ≠ 0} n_b · L_b  +  L_a   ≥   ((1 − δ)(t + 1) − n_0) · μ₀

where ``n_b`` are the task's decisions per arm (``t`` in all, ``n_0`` of the baseline), ``L_b``
an arm's lower confidence bound on its reward ``p̂_b − λ·ĉ_b/cost_unit`` (correctness learnt
from the task's outcomes, ``± z·se``; an arm never learnt counts as always wrong), and ``μ₀``
the baseline's upper bound when the right side is positive (its lower bound otherwise). The
baseline's own plays cancel on both sides, so they need no estimate. Prices are those of the
decision (the λ in force and each arm's estimated cost), so one learnt state serves any λ.

The state is counts and sums: decisions per (task, arm) from the decision log, outcomes per
(task, arm) from the reward log, so it is a projection of the log (and a checkpoint holds it).

    >>> guard = ConservativeGuard({"qa": Conservative("gpt", 0.1)})
    >>> for _ in range(50):
    ...     guard.played("qa", "gpt"); guard.learned("qa", "gpt", 1.0)
    >>> guard.allows("qa", "mini", Pricing(0.0, 0.001))   # 50·0.1 of slack: enough for one
    True
    >>> for _ in range(5):
    ...     guard.played("qa", "mini"); guard.learned("qa", "mini", 0.0)
    >>> guard.allows("qa", "mini", Pricing(0.0, 0.001))   # mini was wrong 5 times: not again
    False
    >>> guard.allows("other", "mini", Pricing(0.0, 0.001))  # a task without a baseline
    True
    >>> choice = Choice("mini", {"gpt": 0.5, "mini": 0.5})
    >>> guarded = guard.guard("qa", choice, Pricing(0.0, 0.001))
    >>> guarded.arm, guarded.propensity, guarded.probabilities
    ('gpt', 1.0, {'gpt': 1.0, 'mini': 0.0})
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.policy.base import Choice, Pricing


@dataclass(frozen=True)
class Conservative:
    """A task's conservative mode: its ``baseline`` arm, the tolerance ``δ`` (relative: 0.05
    allows 5 % less reward than the baseline's) and the bounds' width ``z`` (standard errors).

    >>> Conservative("gpt", 1.5)
    Traceback (most recent call last):
    ...
    ValueError: tolerance must be in [0, 1), got 1.5
    """

    baseline: str
    tolerance: float
    z: float = 1.96

    def __post_init__(self) -> None:
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if self.z < 0:
            raise ValueError("z must be >= 0")


def _bounds(sums: list[float] | None, z: float) -> tuple[float, float]:
    """(lower, upper) bound on an arm's correctness from its ``[m, Σcorrect, Σcost, m_cost]``
    (never learnt: 0 and 1). The variance adds ``1/m`` so that a few equal outcomes do not
    make a bound of zero width."""
    if sums is None or sums[0] == 0:
        return 0.0, 1.0
    m, p = sums[0], sums[1] / sums[0]
    half = z * math.sqrt((p * (1.0 - p) + 1.0 / m) / m)
    return max(p - half, 0.0), min(p + half, 1.0)


class ConservativeGuard:
    """The conservative budgets of the tasks that name a baseline (module doc)."""

    def __init__(self, rules: Mapping[str, Conservative]) -> None:
        self.rules = dict(rules)
        self._plays: dict[str, dict[str, int]] = {}
        self._sums: dict[str, dict[str, list[float]]] = {}  # [m, Σcorrect, Σcost, m_cost]

    def played(self, task: str, arm: str) -> None:
        """One decision of ``task`` went to ``arm`` (in ``decision_seq`` order)."""
        if task in self.rules:
            plays = self._plays.setdefault(task, {})
            plays[arm] = plays.get(arm, 0) + 1

    def forget_outcomes(self) -> None:
        """Drop the outcomes (a projection of the reward log), keeping the plays (one of the
        decision log): for a policy rebuilt from the whole reward log, which learns them again."""
        self._sums = {}

    def learned(self, task: str, arm: str, correct: float, cost_usd: float | None = None) -> None:
        """An outcome of ``task`` on ``arm`` (in ``reward_seq`` order; cost None: not known)."""
        if task in self.rules:
            sums = self._sums.setdefault(task, {}).setdefault(arm, [0.0, 0.0, 0.0, 0.0])
            sums[0] += 1.0
            sums[1] += float(correct)
            if cost_usd is not None:
                sums[2] += float(cost_usd)
                sums[3] += 1.0

    def _reward_bounds(self, task: str, arm: str, pricing: Pricing) -> tuple[float, float]:
        rule = self.rules[task]
        sums = self._sums.get(task, {}).get(arm)
        lo, hi = _bounds(sums, rule.z)
        if pricing.est_cost is not None and arm in pricing.est_cost:
            cost = pricing.est_cost[arm]
        else:
            cost = sums[2] / sums[3] if sums is not None and sums[3] else 0.0
        charge = pricing.lam * cost / pricing.cost_unit
        return lo - charge, hi - charge

    def allows(self, task: str, arm: str, pricing: Pricing) -> bool:
        """Whether playing ``arm`` now keeps the pessimistic budget of ``task``."""
        rule = self.rules.get(task)
        if rule is None or arm == rule.baseline:
            return True
        plays = self._plays.get(task, {})
        earned = self._reward_bounds(task, arm, pricing)[0]
        for other, n in plays.items():
            if other != rule.baseline:
                earned += n * self._reward_bounds(task, other, pricing)[0]
        t, n0 = sum(plays.values()), plays.get(rule.baseline, 0)
        k = (1.0 - rule.tolerance) * (t + 1) - n0
        lo0, hi0 = self._reward_bounds(task, rule.baseline, pricing)
        return earned >= k * (hi0 if k > 0 else lo0)

    def guard(self, task: str, choice: Choice, pricing: Pricing) -> Choice:
        """``choice``, or the baseline (with probability 1) when ``choice`` could break the
        budget and the baseline is among the arms offered."""
        rule = self.rules.get(task)
        if rule is None or rule.baseline not in choice.probabilities:
            return choice
        if self.allows(task, choice.arm, pricing):
            return choice
        probabilities = {a: float(a == rule.baseline) for a in choice.probabilities}
        return Choice(rule.baseline, probabilities, choice.scores)

    # ------------------------------------------------------------------ state
    def to_dict(self) -> dict[str, Any]:
        """The counts and sums (JSON), with the rules they were counted under."""
        return {
            "rules": {t: [r.baseline, r.tolerance, r.z] for t, r in self.rules.items()},
            "plays": self._plays,
            "sums": self._sums,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConservativeGuard:
        """The guard :meth:`to_dict` gave ``data``.

        >>> g = ConservativeGuard({"qa": Conservative("gpt", 0.1)})
        >>> g.played("qa", "gpt"); g.learned("qa", "gpt", 1.0, 0.002)
        >>> ConservativeGuard.from_dict(g.to_dict()).to_dict() == g.to_dict()
        True
        """
        guard = cls({t: Conservative(*r) for t, r in data["rules"].items()})
        guard._plays = {t: dict(p) for t, p in data["plays"].items()}
        guard._sums = {t: {a: list(s) for a, s in d.items()} for t, d in data["sums"].items()}
        return guard
