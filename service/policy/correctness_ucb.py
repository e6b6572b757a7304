"""LinUCB on correctness, shrunk level by level, priced when choosing.

Each arm ``a`` learns the probability that it answers right, ``P(correct | a, x)``, as a
Gaussian (ridge) model whose prior is tighter the finer the level::

    P̂_a(x) = m + θ_aᵀ x        θ_a ~ N(0, σ² · diag(1/ρ))       (m = ``prior_mean``)

with one prior precision ``ρ`` per block of the service's context layout
(:mod:`service.context`): the **bias** (the arm's overall accuracy: a weak prior, learnt from a
handful of pulls), the **task** one-hot and each declared **categorical feature** (a task's
deviation from the arm's overall accuracy: shrunk toward 0 until the task has seen about
``task_ridge`` pulls, as in a Beta–Bernoulli hierarchy with that many pseudo-counts), the
standardised **length** and numeric features, and the **embedding** (a linear residual, the most
strongly shrunk). That is one ridge regression on a rescaled context (each block ``×
sqrt(ridge / ρ_block)``), so the statistics are :class:`~service.policy.linear.LinearArmStats`:
sums that merge exactly and checkpoint bit for bit. Without a context layout (a policy used on
plain vectors) every coordinate gets ``ridge``.

The choice prices each arm at decision time::

    score_a(x) = P̂_a(x) + α·sqrt(xᵀA_a⁻¹x) − λ·ĉ_a / cost_unit

with λ and the cost estimates ``ĉ`` of :class:`~service.policy.base.Pricing` (by default each
arm's running mean of the costs :meth:`CorrectnessUCB.learn` was given), so one learned state
serves every λ. The draw is ε-mixed over the argmax as in :class:`~service.policy.linucb.LinUCB`
(arms never taught first), so every propensity is exact; an arm whose optimistic estimate stays
below another's, once priced, is only ever drawn by the ε share.

    >>> import numpy as np
    >>> from service.policy.base import Pricing
    >>> policy = CorrectnessUCB(alpha=0.0, epsilon=0.0, seed=0)
    >>> x = np.array([1.0])
    >>> for _ in range(50):
    ...     policy.learn("small", x, 0.0, 0.0001); policy.learn("small", x, 1.0, 0.0001)
    ...     policy.learn("large", x, 1.0, 0.0009)
    >>> {a: round(p, 3) for a, p in policy.estimates(["small", "large"], x).items()}
    {'small': 0.5, 'large': 0.99}
    >>> policy.choose(["small", "large"], x, pricing=Pricing(0.1, 0.001)).arm
    'large'
    >>> policy.choose(["small", "large"], x, pricing=Pricing(1.0, 0.001)).arm
    'small'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from service.policy.base import ArmId, Choice, Context, Pricing, RunningCosts
from service.policy.drift import ChangeDetector
from service.policy.linear import LinearArmStats
from service.policy.linucb import LinUCB


class CorrectnessUCB(LinUCB):
    """LinUCB on correctness with a per-block prior and decision-time pricing (module doc).

    Parameters: ``alpha`` (width of the optimism: ``sqrt(xᵀA⁻¹x)`` is the posterior standard
    deviation in units of the outcome's noise, and a right/wrong outcome's noise is at most 0.5,
    so the default 0.5 adds about one standard deviation), ``epsilon`` (uniform mixing),
    ``ridge`` (the prior precision of the bias, and of every coordinate when no layout is known),
    ``task_ridge`` (task and categorical one-hots), ``length_ridge`` (length and numeric
    features), ``embedding_ridge`` (the embedding), ``prior_mean`` (the accuracy every arm
    starts from), ``seed``, ``project_dim``. Precisions are in units of the noise variance.

    Drift (on by default; ``drift=0`` turns it off): ``drift`` > 0 watches each arm's
    residuals with a :class:`~service.policy.drift.ChangeDetector` of that threshold, and on
    an alarm weighs the arm's evidence ``drift_shrink`` times what it did; :attr:`cost_halflife`
    then asks the cost estimates to forget too (each arm's recorded costs with a half-life of
    ``drift_cost_halflife`` of its calls), so a price change is followed as fast. A merge keeps
    ``self``'s detector (the detectors' sums are not additive).
    """

    kind = "correctness_ucb"
    learns_correctness = True

    def __init__(
        self,
        alpha: float = 0.5,
        ridge: float = 1.0,
        epsilon: float = 0.02,
        task_ridge: float = 10.0,
        length_ridge: float = 10.0,
        embedding_ridge: float = 10.0,
        prior_mean: float = 0.5,
        seed: int | None = None,
        project_dim: int | None = None,
        drift: float = 10.0,
        drift_shrink: float = 0.05,
        drift_cost_halflife: float = 100.0,
    ) -> None:
        super().__init__(
            alpha=alpha, ridge=ridge, epsilon=epsilon, seed=seed, project_dim=project_dim
        )
        if drift < 0 or not 0.0 < drift_shrink <= 1.0 or drift_cost_halflife <= 0:
            raise ValueError("drift >= 0, drift_shrink in (0, 1], drift_cost_halflife > 0")
        self.drift, self.drift_shrink = drift, drift_shrink
        self.drift_cost_halflife = drift_cost_halflife
        self.detector = ChangeDetector(drift) if drift > 0 else None
        for name, value in (
            ("task_ridge", task_ridge),
            ("length_ridge", length_ridge),
            ("embedding_ridge", embedding_ridge),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive")
        self.task_ridge = task_ridge
        self.length_ridge = length_ridge
        self.embedding_ridge = embedding_ridge
        self.prior_mean = prior_mean
        self._scale: np.ndarray | None = None  # per-coordinate rescaling, fixed at first use
        self._costs = RunningCosts()  # the costs :meth:`learn` was told, per arm

    # ------------------------------------------------------------------ the prior per block
    def block_precisions(self, dim: int) -> np.ndarray:
        """The prior precision of each of ``dim`` coordinates, from the context layout of
        ``self.context`` (a :class:`~service.context.ContextBuilder`) when it fits ``dim``."""
        rho = np.full(dim, float(self.ridge))
        layout = getattr(self.context, "layout", None)
        if layout is None or layout.legacy or self.project_dim is not None:
            return rho
        if dim < layout.dim(0):
            return rho
        for name, block in layout.blocks.items():  # the bias keeps ``ridge``
            if name == "length":
                rho[block] = self.length_ridge
            elif name == "task":
                rho[block] = self.task_ridge
            elif name == "embedding":
                rho[block] = self.embedding_ridge
            elif name != "bias":  # a feature: one-hots as the task's, numeric pairs as length
                wide = block.stop - block.start > 2  # (a one-hot of 2 buckets reads as a pair)
                rho[block] = self.task_ridge if wide else self.length_ridge
        return rho

    def _scaled(self, X: np.ndarray) -> np.ndarray:
        """Contexts (in the policy's space) rescaled block by block; the scale is fixed by
        the first context seen."""
        if self._scale is None:
            self._scale = np.sqrt(self.ridge / self.block_precisions(X.shape[-1]))
        return X * self._scale

    def _vector(self, context: Context) -> np.ndarray:
        return self._scaled(super()._vector(context))

    def _matrix(self, contexts: np.ndarray) -> np.ndarray:
        return self._scaled(super()._matrix(contexts))

    # ------------------------------------------------------------------ learning
    def update(self, arm_id: ArmId, context: Context, reward: float) -> None:  # type: ignore[override]
        """The scalar path: learn ``reward`` (then chosen by without a price)."""
        super().update(arm_id, context, float(reward) - self.prior_mean)

    def update_many(self, arm_id: ArmId, contexts: np.ndarray, rewards: Sequence[float]) -> None:
        shifted = np.asarray(rewards, dtype=np.float64) - self.prior_mean
        super().update_many(arm_id, contexts, shifted)

    def learn(
        self,
        arm_id: ArmId,
        context: Context,
        correct: float,
        cost_usd: float | None,
        propensity: float | None = None,
        pricing: Pricing | None = None,
    ) -> None:
        """The priced path: learn correctness (1.0 / 0.0 or a score) and the call's cost
        (``propensity`` and ``pricing`` play no part here: see ``RoutingPolicy.learn``).
        With drift on, the outcome's residual is watched first (class doc)."""
        x = self._vector(context)
        stats, i = self._slot(arm_id, x.shape[0])
        x32 = x.astype(np.float32)
        # S_i x, for the drift watch's estimate and the update's step (not kept: the update
        # changes S_i)
        u = stats.product(i, x32, keep=False)
        watched = self.detector is not None and stats.counts[i] > 0  # (a new arm is not)
        if watched and self._watch(arm_id, stats, i, u, float(correct)):
            u = stats.product(i, x32, keep=False)  # the alarm re-derived the arm's scorer
        stats.update_with_product(i, x, float(correct) - self.prior_mean, x32, u)
        self._n_updates += 1
        if cost_usd is not None:
            self._costs.observe(arm_id, cost_usd)

    @property
    def cost_halflife(self) -> float | None:
        """With drift on, the half-life (in an arm's calls) its cost estimates should forget
        with (None: never forget)."""
        return self.drift_cost_halflife if self.detector is not None else None

    def _watch(
        self, arm_id: ArmId, stats: LinearArmStats, i: int, u: np.ndarray, correct: float
    ) -> bool:
        """Feed the detector the residual of ``correct`` against the estimate of the arm (slot
        ``i`` of ``stats``) on the outcome's context, from ``u`` = its ``S_i x`` on the float32
        scorer; on an alarm shrink the arm's evidence and return True."""
        assert self.detector is not None
        mean = float(u.astype(np.float64) @ stats.b[i])
        residual = correct - min(max(self.prior_mean + mean, 0.0), 1.0)
        if self.detector.observe(arm_id, residual):
            stats.shrink(i, self.drift_shrink)
            return True
        return False

    def mean_costs(self) -> dict[ArmId, float]:
        """Each arm's mean cost over the calls :meth:`learn` was told the cost of."""
        return self._costs.means()

    def estimates(self, arm_ids: Sequence[ArmId], context: Context) -> dict[ArmId, float]:
        """The estimated probability that each arm answers right on ``context`` (closed form
        ``m + θᵀx`` from the exact statistics, unclipped)."""
        x = self._vector(context)
        stats = self._stats_for(x.shape[0])
        out = {}
        for arm in arm_ids:
            i = stats.index.get(arm)
            theta = None if i is None else stats.exact(i)[1]
            out[arm] = self.prior_mean + (0.0 if theta is None else float(theta @ x))
        return out

    # ------------------------------------------------------------------ choosing
    def _shift(self, arm_ids: Sequence[ArmId], pricing: Pricing | None) -> list[float]:
        """What each arm's score is moved by: the prior mean, less its price if priced."""
        if pricing is None:
            return [self.prior_mean] * len(arm_ids)
        m = self.prior_mean
        return [m - c for c in pricing.penalty_list(arm_ids, self.mean_costs())]

    def choose(  # type: ignore[override]
        self, arm_ids: Sequence[ArmId], context: Context, pricing: Pricing | None = None
    ) -> Choice:
        """Draw an arm for ``context``; priced by ``pricing`` (None: correctness alone, or
        the scalar rewards taught through ``update``)."""
        return self._choose(arm_ids, context, self._shift(arm_ids, pricing))

    def distribution(  # type: ignore[override]
        self, arm_ids: Sequence[ArmId], context: Context, pricing: Pricing | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The distribution :meth:`choose` draws from, priced by ``pricing``, and each arm's
        ``θ_aᵀx`` (its estimate minus ``prior_mean``), arm by arm (see
        :meth:`LinUCB.distribution`)."""
        return self._distribution(arm_ids, context, self._shift(arm_ids, pricing))

    def choose_many(  # type: ignore[override]
        self, arm_ids: Sequence[ArmId], contexts: np.ndarray, pricing: Pricing | None = None
    ) -> list[Choice]:
        """Vectorised :meth:`choose` (the same draws as successive calls)."""
        return self._choose_many(arm_ids, contexts, self._shift(arm_ids, pricing))

    # ------------------------------------------------------------------ arms, merge, state
    def remove_arm(self, arm_id: ArmId) -> None:
        super().remove_arm(arm_id)
        self._costs.forget(arm_id)

    def merge(self, other: CorrectnessUCB) -> CorrectnessUCB:
        """Summed statistics and cost sums of both (see :meth:`LinearPolicy.merge`)."""
        new = super().merge(other)
        scales = [s for s in (self._scale, other._scale) if s is not None]
        if len(scales) == 2 and not np.array_equal(*scales):
            raise ValueError("cannot merge policies with different context layouts")
        new._scale = None if not scales else scales[0].copy()
        if self.detector is not None and new.detector is not None:
            new.detector.load(self.detector.to_dict())
        new._costs = self._costs.merged(other._costs)
        return new

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta, arrays = super()._state()
        cost_n, cost_sum = self._costs.counts_and_totals(self.arms)
        arrays = {**arrays, "cost_n": cost_n, "cost_sum": cost_sum}
        if self._scale is not None:
            arrays["scale"] = self._scale
        if self.detector is not None:
            meta = {**meta, "drift": self.detector.to_dict()}
        return meta, arrays

    def _load_state(self, meta: dict, arms: list, arrays: Mapping[str, np.ndarray]) -> None:
        super()._load_state(meta, arms, dict(arrays))
        self._scale = arrays.get("scale")
        if self.detector is not None and "drift" in meta:
            self.detector.load(meta["drift"])
        self._costs = RunningCosts.from_counts_and_totals(
            arms, arrays["cost_n"], arrays["cost_sum"]
        )
