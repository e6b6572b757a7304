"""River's ``bandit.UCB`` as a baseline with exact propensities.

Scores are River's upper bounds ``mean + delta·sqrt(2·ln n / n_a)`` (never-pulled arms: +∞,
i.e. explored first; they are left out of ``scores`` since ∞ is not JSON). Probabilities are
exact: ``(1−ε)·argmax(ties split evenly) + ε/k``.

    >>> policy = RiverUCB(delta=0.5, epsilon=0.0, seed=0)
    >>> policy.update("a", None, 1.0); policy.update("b", None, 0.0)
    >>> policy.choose(["a", "b"], None).probabilities
    {'a': 1.0, 'b': 0.0}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from river import bandit, proba

from service.policy.base import ArmId, Choice, Context, draw, mixed_greedy_probabilities
from service.policy.baselines import RiverBaseline


class RiverUCB(RiverBaseline):
    """``river.bandit.UCB(delta)`` with exact ε-mixed probabilities (see module docstring)."""

    kind = "ucb"

    def __init__(self, delta: float = 1.0, epsilon: float = 0.05, seed: int | None = None) -> None:
        super().__init__(epsilon=epsilon, seed=seed)
        self.delta = delta
        self._river = bandit.UCB(delta=delta, seed=seed)

    def upper_bounds(self, arm_ids: Sequence[ArmId]) -> np.ndarray:
        """River's UCB ``_pull`` scores for ``arm_ids`` (+∞ for never-updated arms)."""
        river = self._river
        out = np.empty(len(arm_ids))
        for j, arm in enumerate(arm_ids):
            stat = river._rewards.get(arm)
            if stat is None or river._counts[arm] == 0:
                out[j] = math.inf
            elif isinstance(stat, proba.base.Distribution):
                out[j] = stat.mode
            else:
                bonus = math.sqrt(2 * math.log(river._n) / river._counts[arm])
                out[j] = stat.get() + self.delta * bonus
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

    def _merge_into(self, new: RiverBaseline, other: RiverBaseline) -> None:
        for arm, stat in other._river._rewards.items():
            if arm in new._river._rewards:
                new._river._rewards[arm] += stat  # river.stats.Mean supports exact merging
            else:
                new._river._rewards[arm] = stat.clone(include_attributes=True)
