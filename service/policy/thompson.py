"""River's ``bandit.ThompsonSampling`` with ``proba.Beta`` posteriors, as a baseline.

Rewards in [0, 1] are fed as Bernoulli trials ``1[u < r]`` (rewards are clipped to [0, 1]
first; the standard binarisation of Agrawal & Goyal 2012). **Probabilities are estimated by
sampling** (``n_samples`` posterior draws per decision); the arm is drawn from exactly the
logged ``(1−ε)·p̂ + ε/k``. Never-pulled arms share the ``1−ε`` mass.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np
from river import bandit, proba

from service.policy.base import ArmId, Choice, Context, draw
from service.policy.baselines import RiverBaseline


class RiverThompson(RiverBaseline):
    """``river.bandit.ThompsonSampling(proba.Beta(alpha, beta))`` with sampled probabilities."""

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
        self._river = bandit.ThompsonSampling(reward_obj=proba.Beta(alpha, beta), seed=seed)

    def _learn(self, arm_id: ArmId, reward: float) -> None:
        success = self._rng.random() < min(max(reward, 0.0), 1.0)
        self._river.update(arm_id, success)

    def posterior(self, arm_id: ArmId) -> tuple[float, float]:
        """Beta posterior ``(alpha, beta)`` of ``arm_id`` (the prior for unknown arms)."""
        dist = self._river._rewards.get(arm_id)
        return (self.alpha, self.beta) if dist is None else (dist.alpha, dist.beta)

    def choose(self, arm_ids: Sequence[ArmId], context: Context | None = None) -> Choice:
        """Draw an arm among ``arm_ids`` (context ignored); probabilities by sampling."""
        self._register(arm_ids)
        k = len(arm_ids)
        params = np.array([self.posterior(a) for a in arm_ids])
        means = params[:, 0] / params.sum(axis=1)
        unexplored = np.array([self._river._counts[a] == 0 for a in arm_ids])
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

    def _merge_into(self, new: RiverBaseline, other: RiverBaseline) -> None:
        for arm, dist in other._river._rewards.items():
            mine = new._river._rewards.get(arm)
            if mine is None:
                new._river._rewards[arm] = pickle.loads(pickle.dumps(dist))  # noqa: S301
            else:
                mine.alpha += dist.alpha - dist._alpha
                mine.beta += dist.beta - dist._beta
