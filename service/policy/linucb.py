"""Disjoint LinUCB with ε-mixing, so every arm keeps a known non-zero propensity.

Score of arm ``a`` on context ``x`` (Li et al. 2010, disjoint model)::

    ucb_a(x) = θ_aᵀx + α·sqrt(xᵀ A_a⁻¹ x)

The choice is drawn from ``(1-ε)·argmax + ε/k``: the argmax set (exact ties split evenly)
shares ``1-ε`` and every one of the ``k`` candidates gets ``ε/k`` on top, so each arm's
probability is at least ``ε/k`` and the logged propensity is exact. Arms with no update yet
form the argmax set on their own (a new arm is explored first).

    >>> import numpy as np
    >>> policy = LinUCB(alpha=1.0, ridge=1.0, epsilon=0.1, seed=0)
    >>> x = np.array([1.0, 0.0, 0.5])
    >>> policy.update("small", x, 1.0); policy.update("large", x, 0.2)
    >>> choice = policy.choose(["small", "large"], x)
    >>> {arm: round(p, 3) for arm, p in choice.probabilities.items()}
    {'small': 0.95, 'large': 0.05}
    >>> choice.arm, round(choice.propensity, 2)
    ('small', 0.95)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from service.policy.base import (
    ArmId,
    Choice,
    Context,
    check_ucb_params,
    draw,
    greedy_mix,
    greedy_mix_row,
    row_max,
)
from service.policy.linear import LinearPolicy


class LinUCB(LinearPolicy):
    """Disjoint LinUCB (ridge ``A = ridge·I + Σxxᵀ``), exploration width ``alpha``, ε-mixing.

    Parameters: ``alpha`` ≥ 0 scales the confidence width; ``ridge`` > 0 is the prior
    precision; ``epsilon`` in [0, 1] is the uniform mixing weight; ``seed`` seeds the numpy
    ``Generator`` that draws the arm; ``project_dim`` optionally projects contexts to that
    many dimensions with a seeded Gaussian random matrix (entries ``N(0, 1/project_dim)``).
    """

    kind = "linucb"

    def __init__(
        self,
        alpha: float = 1.0,
        ridge: float = 1.0,
        epsilon: float = 0.05,
        seed: int | None = None,
        project_dim: int | None = None,
    ) -> None:
        super().__init__(ridge=ridge, seed=seed, project_dim=project_dim)
        check_ucb_params(alpha, epsilon)
        self.alpha = alpha
        self.epsilon = epsilon

    def _probabilities(self, ucb: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """ε-mixed argmax; arms with no update form the greedy set on their own."""
        if not counts.all():
            greedy = counts == 0
        elif ucb.ndim == 1:
            greedy = ucb == ucb.max()
        else:
            greedy = ucb == ucb.max(axis=-1, keepdims=True)
        return greedy_mix(greedy, self.epsilon)

    def _probabilities_row(self, ucb: list[float], counts: list[int]) -> list[float]:
        """:meth:`_probabilities` of one decision, in Python floats (the same floats)."""
        if 0 in counts:
            greedy = [c == 0 for c in counts]
        else:
            top = row_max(ucb)
            greedy = [u == top for u in ucb]
        return greedy_mix_row(greedy, self.epsilon)

    def choose(self, arm_ids: Sequence[ArmId], context: Context) -> Choice:
        """Draw an arm among ``arm_ids`` for ``context``; returns it with all probabilities."""
        return self._choose(arm_ids, context, None)

    def choose_many(self, arm_ids: Sequence[ArmId], contexts: np.ndarray) -> list[Choice]:
        """Vectorised :meth:`choose` for each row of ``contexts`` (n, d), against the current
        statistics. Uses the random stream exactly as ``n`` successive ``choose`` calls do."""
        return self._choose_many(arm_ids, contexts, None)

    def distribution(
        self, arm_ids: Sequence[ArmId], context: Context
    ) -> tuple[np.ndarray, np.ndarray]:
        """The distribution :meth:`choose` draws from on ``context`` (no draw made), and each
        arm's mean ``θ_aᵀx``, both in ``arm_ids`` order: what an off-policy score of this
        policy needs (:mod:`service.policy.selector`).

        Computed arm by arm (one fixed-shape product each, :meth:`LinearArmStats.products`),
        not as the stacked product of a choice: the stacked product's rounding depends on
        where an arm sits in the stack, which depends on the order arms were offered to this
        instance, and a score must be a function of the log alone. So the probabilities may
        differ from a choice's in the last bits.

        >>> policy = LinUCB(alpha=0.0, epsilon=0.1, seed=0)
        >>> policy.update("a", np.ones(2), 1.0); policy.update("b", np.ones(2), 0.0)
        >>> p, mean = policy.distribution(["a", "b"], np.ones(2))
        >>> p.round(3).tolist(), mean.round(3).tolist()
        ([0.95, 0.05], [0.667, 0.0])
        """
        return self._distribution(arm_ids, context, None)

    def _distribution(
        self, arm_ids: Sequence[ArmId], context: Context, shift: Sequence[float] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`distribution` with ``shift`` added to the scores (as in :meth:`_choose`)."""
        x = self._vector(context)
        stats = self._stats_for(x.shape[0])
        slots = stats.slots(arm_ids)
        x32 = x.astype(np.float32)
        V = stats.products(slots, x32)  # rows S_a x, each the one-arm product
        # per-arm dot products, batched: (1, d)·(d, 1) products are each arm's own dot
        mean = np.matmul(V.astype(np.float64)[:, None, :], stats.b[slots][:, :, None])[:, 0, 0]
        variance = np.matmul(V[:, None, :], x32[:, None])[:, 0, 0].astype(np.float64)
        np.maximum(variance, 0.0, out=variance)
        ucb = mean + self.alpha * np.sqrt(variance)
        if shift is not None:
            ucb = ucb + shift
        return self._probabilities(ucb, stats.counts[slots]), mean

    def _choose(
        self, arm_ids: Sequence[ArmId], context: Context, shift: Sequence[float] | None
    ) -> Choice:
        """:meth:`choose` with ``shift`` (one number per arm of ``arm_ids``) added to the
        scores: how a subclass prices arms or moves the prior mean."""
        if not arm_ids:
            raise ValueError("arm_ids is empty")
        x = self._vector(context)
        stats = self._stats if self._stats is not None else self._stats_for(x.shape[0])
        slots = stats.slots(arm_ids).tolist()
        mean, variance = stats.mean_and_variance(x)
        # The few scores of one decision in Python floats: the same IEEE double operations
        # as numpy's on arrays (sqrt is correctly rounded in both), without numpy's cost per
        # call, which on 8 arms is most of the arithmetic's.
        m, v, n = mean.tolist(), variance.tolist(), stats.counts.tolist()
        alpha = float(self.alpha)
        if shift is None:
            ucb = [m[i] + alpha * math.sqrt(v[i]) for i in slots]
        else:
            ucb = [m[i] + alpha * math.sqrt(v[i]) + s for i, s in zip(slots, shift, strict=True)]
        p = self._probabilities_row(ucb, [n[i] for i in slots])
        j = draw(p, self._rng.random())
        return Choice(
            arm=arm_ids[j],
            probabilities=dict(zip(arm_ids, p, strict=True)),
            scores=dict(zip(arm_ids, ucb, strict=True)),
        )

    def _choose_many(
        self, arm_ids: Sequence[ArmId], contexts: np.ndarray, shift: Sequence[float] | None
    ) -> list[Choice]:
        if not arm_ids:
            raise ValueError("arm_ids is empty")
        if type(contexts) is np.ndarray and contexts.ndim == 2 and contexts.shape[0] == 1:
            # one context (the service prices each query on its own): :meth:`choose`'s
            # arithmetic, one product per arm of the stacked statistics, not a matrix product
            return [self._choose(arm_ids, contexts[0], shift)]
        X = self._matrix(contexts)
        if X.shape[0] == 0:
            return []
        stats = self._stats_for(X.shape[1])
        slots = stats.slots(arm_ids)
        mean, variance = stats.mean_and_variance_many(X, slots)
        ucb = mean + self.alpha * np.sqrt(variance)
        if shift is not None:
            ucb = ucb + shift
        P = self._probabilities(ucb, stats.counts[slots])
        if P.ndim == 1:  # unexplored arms: the same distribution on every row
            P = np.broadcast_to(P, ucb.shape)
        U = self._rng.random(X.shape[0])
        C = np.cumsum(P, axis=1)
        J = ((U * C[:, -1])[:, None] >= C).sum(axis=1)
        J = np.minimum(J, len(arm_ids) - 1)
        return [
            Choice(
                arm=arm_ids[j],
                probabilities=dict(zip(arm_ids, p, strict=True)),
                scores=dict(zip(arm_ids, s, strict=True)),
            )
            for j, p, s in zip(J.tolist(), P.tolist(), ucb.tolist(), strict=True)
        ]
