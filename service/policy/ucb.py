"""River's ``bandit.UCB`` rule as a baseline with exact propensities.

Each arm's mean reward is kept as River's ``stats.Mean`` keeps it (the same running update and
the same exact merge). Scores are River's upper bounds ``mean + delta·sqrt(2·ln n / n_a)``
(never-pulled arms: +∞, i.e. explored first; they are left out of ``scores`` since ∞ is not
JSON). Probabilities are exact: ``(1−ε)·argmax(ties split evenly) + ε/k``.

    >>> policy = RiverUCB(delta=0.5, epsilon=0.0, seed=0)
    >>> policy.update("a", None, 1.0); policy.update("b", None, 0.0)
    >>> policy.choose(["a", "b"], None).probabilities
    {'a': 1.0, 'b': 0.0}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.policy.base import ArmId, Choice, Context, draw, mixed_greedy_probabilities
from service.policy.baselines import RiverBaseline


class RiverUCB(RiverBaseline):
    """``river.bandit.UCB(delta)`` with exact ε-mixed probabilities (see module docstring)."""

    kind = "ucb"

    def __init__(self, delta: float = 1.0, epsilon: float = 0.05, seed: int | None = None) -> None:
        super().__init__(epsilon=epsilon, seed=seed)
        self.delta = delta
        self._means: dict[ArmId, float] = {}

    def mean(self, arm_id: ArmId) -> float:
        """The mean reward ``arm_id`` has learned (0 before its first reward)."""
        return self._means.get(arm_id, 0.0)

    def upper_bounds(self, arm_ids: Sequence[ArmId]) -> np.ndarray:
        """River's UCB ``_pull`` scores for ``arm_ids`` (+∞ for never-updated arms)."""
        out = np.empty(len(arm_ids))
        for j, arm in enumerate(arm_ids):
            pulls = self._pulls[arm]
            if pulls == 0:
                out[j] = math.inf
            else:
                bonus = math.sqrt(2 * math.log(self._total) / pulls)
                out[j] = self._means[arm] + self.delta * bonus
        return out

    def choose(self, arm_ids: Sequence[ArmId], context: Context | None = None) -> Choice:
        """Draw an arm among ``arm_ids`` (context ignored) with exact probabilities."""
        self._register(arm_ids)
        bounds = self.upper_bounds(arm_ids)
        p = mixed_greedy_probabilities(bounds, self.epsilon)[0]
        j = draw(p, self._rng.random())
        return Choice(
            arm=arm_ids[j],
            probabilities=dict(zip(arm_ids, p.tolist(), strict=True)),
            scores={
                a: s for a, s in zip(arm_ids, bounds.tolist(), strict=True) if math.isfinite(s)
            },
        )

    def _learn(self, arm_id: ArmId, reward: float) -> None:
        mean = self._means.get(arm_id, 0.0)
        self._means[arm_id] = mean + (1.0 / self._pulls[arm_id]) * (reward - mean)  # stats.Mean

    def _forget(self, arm_id: ArmId) -> None:
        self._means.pop(arm_id, None)

    def _add_stats(self, other: RiverBaseline) -> None:
        assert isinstance(other, RiverUCB)
        for arm, theirs in other._means.items():  # stats.Mean's exact merge
            n, m = self._pulls[arm], other._pulls[arm]
            mine = self._means.get(arm, 0.0)
            self._means[arm] = (n * mine + m * theirs) / (n + m)

    def _stats(self) -> dict[str, np.ndarray]:
        return {"means": np.array([self.mean(a) for a in self._arm_list], dtype=np.float64)}

    def _load_stats(self, arms: list, arrays: dict[str, np.ndarray]) -> None:
        self._means = {
            a: m for a, m in zip(arms, arrays["means"].tolist(), strict=True) if self._pulls[a]
        }

    def _load_river_stats(self, rewards: dict[ArmId, Any]) -> None:
        self._means = {a: float(stat.get()) for a, stat in rewards.items() if self._pulls[a]}
