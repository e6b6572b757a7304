"""Linear Thompson sampling (Agrawal & Goyal 2013), disjoint, on the shared ridge statistics.

Per decision, each arm's parameter is sampled from ``N(θ_a, v²·A_a⁻¹)`` and the arm with the
largest sampled reward ``θ̃_aᵀx`` wins. Only the scalar ``θ̃_aᵀx ~ N(θ_aᵀx, v²·xᵀA_a⁻¹x)``
matters for the decision, so it is sampled directly (same law, O(k) instead of O(k·d²)).

**Choice probabilities are estimated by sampling**: the probability that arm ``a`` wins is
estimated from ``n_samples`` Thompson draws (its Monte Carlo frequency ``p̂_a``). The arm is
then drawn from exactly the logged distribution ``(1−ε)·p̂ + ε/k``, so the logged propensity
is the true probability of the draw that happened (useful for unbiased off-policy estimates),
while ``p̂`` itself is an estimate of pure Thompson sampling's probabilities, with standard
error ≈ ``sqrt(p̂(1−p̂)/n_samples)``. Every arm keeps probability ≥ ε/k. As in
:class:`~service.policy.linucb.LinUCB`, arms with no update yet share the ``1−ε`` mass exactly.

    >>> import numpy as np
    >>> policy = LinTS(v=0.5, epsilon=0.1, n_samples=1000, seed=0)
    >>> x = np.array([1.0, 0.0])
    >>> for _ in range(20):
    ...     policy.update("good", x, 1.0); policy.update("bad", x, 0.0)
    >>> choice = policy.choose(["good", "bad"], x)
    >>> choice.arm, round(choice.probabilities["bad"], 2)
    ('good', 0.05)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.policy.base import ArmId, Choice, Context, draw
from service.policy.linear import LinearPolicy


class LinTS(LinearPolicy):
    """Disjoint linear Thompson sampling with Monte Carlo choice probabilities.

    Parameters: ``v`` ≥ 0 scales the posterior spread; ``ridge`` > 0 is the prior precision;
    ``epsilon`` in [0, 1] is the uniform mixing weight; ``n_samples`` ≥ 1 is the number of
    Thompson draws used to estimate the choice probabilities; ``seed``; ``project_dim``.
    The reported ``scores`` are the posterior means ``θ_aᵀx``.
    """

    kind = "lin_ts"

    def __init__(
        self,
        v: float = 0.5,
        ridge: float = 1.0,
        epsilon: float = 0.05,
        n_samples: int = 512,
        seed: int | None = None,
        project_dim: int | None = None,
    ) -> None:
        super().__init__(ridge=ridge, seed=seed, project_dim=project_dim)
        if v < 0:
            raise ValueError("v must be >= 0")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        self.v = v
        self.epsilon = epsilon
        self.n_samples = n_samples

    def _probabilities(self, mean: np.ndarray, sd: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Monte Carlo P(arm wins) from ``n_samples`` draws, ε-mixed (consumes the RNG).

        Arms without any update share the ``1−ε`` mass exactly (new arms are explored first).
        """
        k = mean.shape[0]
        unexplored = counts == 0
        if unexplored.any():
            return (1.0 - self.epsilon) * unexplored / unexplored.sum() + self.epsilon / k
        samples = mean + sd * self._rng.standard_normal((self.n_samples, k))
        wins = np.bincount(samples.argmax(axis=1), minlength=k)
        return (1.0 - self.epsilon) * wins / self.n_samples + self.epsilon / k

    def choose(self, arm_ids: Sequence[ArmId], context: Context) -> Choice:
        """Draw an arm among ``arm_ids``; probabilities are Monte Carlo estimates (see module)."""
        if not arm_ids:
            raise ValueError("arm_ids is empty")
        x = self._vector(context)
        stats = self._stats_for(x.shape[0])
        slots = stats.slots(arm_ids)
        mean, variance = stats.mean_and_variance(x)
        mean, sd = mean[slots], self.v * np.sqrt(variance[slots])
        p = self._probabilities(mean, sd, stats.counts[slots])
        j = draw(p, self._rng.random())
        return Choice(
            arm=arm_ids[j],
            probabilities=dict(zip(arm_ids, p.tolist(), strict=True)),
            scores=dict(zip(arm_ids, mean.tolist(), strict=True)),
        )

    def choose_many(self, arm_ids: Sequence[ArmId], contexts: np.ndarray) -> list[Choice]:
        """Vectorised scoring of all rows; random draws in the same order as successive
        :meth:`choose` calls, so the result equals them for the same seed."""
        if not arm_ids:
            raise ValueError("arm_ids is empty")
        X = self._matrix(contexts)
        if X.shape[0] == 0:
            return []
        stats = self._stats_for(X.shape[1])
        slots = stats.slots(arm_ids)
        means, variances = stats.mean_and_variance_many(X, slots)
        sds = self.v * np.sqrt(variances)
        counts = stats.counts[slots]
        out = []
        for mean, sd in zip(means, sds, strict=True):
            p = self._probabilities(mean, sd, counts)
            j = draw(p, self._rng.random())
            out.append(
                Choice(
                    arm=arm_ids[j],
                    probabilities=dict(zip(arm_ids, p.tolist(), strict=True)),
                    scores=dict(zip(arm_ids, mean.tolist(), strict=True)),
                )
            )
        return out
