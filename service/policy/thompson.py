"""River's ``bandit.ThompsonSampling`` with ``proba.Beta`` posteriors, as a baseline.

Each arm's posterior is ``Beta(alpha + wins, beta + pulls − wins)``, as River's ``proba.Beta``
counts it; the wins are kept here.

Rewards in [0, 1] are fed as Bernoulli trials ``1[u < r]`` (rewards are clipped to [0, 1]
first; the standard binarisation of Agrawal & Goyal 2012). **Probabilities are estimated by
sampling** (``n_samples`` posterior draws per decision); the arm is drawn from exactly the
logged ``(1−ε)·p̂ + ε/k``. Never-pulled arms share the ``1−ε`` mass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.policy.base import ArmId, Choice, Context, draw
from service.policy.baselines import RiverBaseline


class RiverThompson(RiverBaseline):
    """River's ``bandit.ThompsonSampling(proba.Beta(alpha, beta))`` with sampled
    probabilities."""

    kind = "thompson"

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        epsilon: float = 0.05,
        n_samples: int = 512,
        seed: int | None = None,
    ) -> None:
        super().__init__(epsilon=epsilon, seed=seed)
        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        self.alpha = alpha
        self.beta = beta
        self.n_samples = n_samples
        self._wins: Counter[ArmId] = Counter()  # Bernoulli successes per arm

    def _learn(self, arm_id: ArmId, reward: float) -> None:
        if self._rng.random() < min(max(reward, 0.0), 1.0):
            self._wins[arm_id] += 1

    def posterior(self, arm_id: ArmId) -> tuple[float, float]:
        """Beta posterior ``(alpha, beta)`` of ``arm_id`` (the prior for unknown arms)."""
        wins = self._wins[arm_id]
        return self.alpha + wins, self.beta + self._pulls[arm_id] - wins

    def choose(self, arm_ids: Sequence[ArmId], context: Context | None = None) -> Choice:
        """Draw an arm among ``arm_ids`` (context ignored); probabilities by sampling."""
        self._register(arm_ids)
        k = len(arm_ids)
        params = np.array([self.posterior(a) for a in arm_ids])
        means = params[:, 0] / params.sum(axis=1)
        unexplored = np.array([self._pulls[a] == 0 for a in arm_ids])
        if unexplored.any():
            p = (1.0 - self.epsilon) * unexplored / unexplored.sum() + self.epsilon / k
        else:
            samples = self._rng.beta(params[:, 0], params[:, 1], size=(self.n_samples, k))
            wins = np.bincount(samples.argmax(axis=1), minlength=k)
            p = (1.0 - self.epsilon) * wins / self.n_samples + self.epsilon / k
        j = draw(p, self._rng.random())
        return Choice(
            arm=arm_ids[j],
            probabilities=dict(zip(arm_ids, p.tolist(), strict=True)),
            scores=dict(zip(arm_ids, means.tolist(), strict=True)),
        )

    def _forget(self, arm_id: ArmId) -> None:
        self._wins.pop(arm_id, None)

    def _add_stats(self, other: RiverBaseline) -> None:
        assert isinstance(other, RiverThompson)
        self._wins.update(other._wins)

    def _stats(self) -> dict[str, np.ndarray]:
        return {"wins": np.array([self._wins[a] for a in self._arm_list], dtype=np.int64)}

    def _load_stats(self, arms: list, arrays: dict[str, np.ndarray]) -> None:
        self._wins = Counter(
            {a: w for a, w in zip(arms, arrays["wins"].tolist(), strict=True) if w}
        )

    def _load_river_stats(self, rewards: dict[ArmId, Any]) -> None:
        # a River Beta counts a success as alpha + 1 from the prior alpha
        self._wins = Counter({a: round(dist.alpha - self.alpha) for a, dist in rewards.items()})
