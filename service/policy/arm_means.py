"""The best fixed arm, learnt fast: each arm's mean outcome (optionally per task), priced when
choosing.

Each arm ``a`` keeps the count and sum of its outcomes (correctness on the priced path, the
reward on the scalar one) overall and, with ``by_task``, per task of the context (the hashed
task bucket of the service's context layout, :mod:`service.context`; one group when no layout is
known or the context is a dict). A task's mean is shrunk toward the arm's overall mean as a
Beta–Bernoulli hierarchy with ``prior_weight`` pseudo-counts::

    m_a   = (S_a + prior_mean) / (n_a + 1)
    m_a,g = (S_a,g + w·m_a) / (n_a,g + w)                       (w = prior_weight)
    score = m + alpha / sqrt(n + w) − λ·ĉ_a / cost_unit          (n, w: of the level used)

The draw is ε-mixed over the argmax (arms never taught first), so every propensity is exact.
No embedding is read: it is what keeps a router at least as good as the best single arm
(per task) where the context does not help, and it learns that arm from a handful of pulls.

    >>> import numpy as np
    >>> from service.policy.base import Pricing
    >>> policy = ArmMeans(alpha=0.0, epsilon=0.0, seed=0)
    >>> x = np.zeros(3)
    >>> for _ in range(20):
    ...     policy.learn("small", x, 0.0, 0.0001); policy.learn("small", x, 1.0, 0.0001)
    ...     policy.learn("large", x, 1.0, 0.0009)
    >>> {a: round(m, 3) for a, m in policy.means(["small", "large"], x).items()}
    {'small': 0.5, 'large': 0.976}
    >>> policy.choose(["small", "large"], x, pricing=Pricing(0.1, 0.001)).arm
    'large'
    >>> policy.choose(["small", "large"], x, pricing=Pricing(1.0, 0.001)).arm
    'small'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from service.policy.base import (
    ArmId,
    Choice,
    Context,
    Pricing,
    RoutingPolicy,
    RunningCosts,
    check_ucb_params,
    draw,
    greedy_mix,
)

NO_GROUP = -1


class ArmMeans(RoutingPolicy):
    """Per-arm (and, with ``by_task``, per-task shrunk) mean outcomes, priced (module doc).

    Parameters: ``alpha`` (optimism, in outcome units at one pseudo-count), ``epsilon``
    (uniform mixing), ``prior_weight`` (pseudo-counts of the arm's mean in a task's),
    ``prior_mean`` (an arm's mean before any outcome), ``by_task``, ``seed``.
    """

    kind = "arm_means"
    learns_correctness = True

    def __init__(
        self,
        alpha: float = 0.5,
        epsilon: float = 0.02,
        prior_weight: float = 10.0,
        prior_mean: float = 0.5,
        by_task: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed)
        check_ucb_params(alpha, epsilon)
        if prior_weight <= 0:
            raise ValueError("prior_weight must be positive")
        self.alpha = alpha
        self.epsilon = epsilon
        self.prior_weight = prior_weight
        self.prior_mean = prior_mean
        self.by_task = by_task
        self._arms: list[ArmId] = []
        self._sums: dict[tuple[int, ArmId], list[float]] = {}  # (group, arm) → [n, Σ outcome]
        self._costs = RunningCosts()  # the costs :meth:`learn` was told, per arm

    # ------------------------------------------------------------------ groups
    def group(self, context: Context) -> int:
        """The task bucket of ``context`` (``NO_GROUP`` without ``by_task`` or a layout)."""
        layout = getattr(self.context, "layout", None)
        if not self.by_task or layout is None or layout.legacy or isinstance(context, Mapping):
            return NO_GROUP
        x = np.asarray(context)
        block = x[layout.block("task")]
        if x.ndim != 1 or x.shape[0] < layout.dim(0) or not block.any():
            return NO_GROUP
        return int(np.argmax(block))

    # ------------------------------------------------------------------ learning
    def _observe(self, arm_id: ArmId, context: Context, value: float) -> None:
        if arm_id not in self._arms:
            self._arms.append(arm_id)
        keys = [(NO_GROUP, arm_id)]
        g = self.group(context)
        if g != NO_GROUP:
            keys.append((g, arm_id))
        for key in keys:
            sums = self._sums.setdefault(key, [0.0, 0.0])
            sums[0] += 1.0
            sums[1] += value
        self._n_updates += 1

    def update(self, arm_id: ArmId, context: Context, reward: float) -> None:  # type: ignore[override]
        """The scalar path: learn ``reward`` (then chosen by without a price)."""
        self._observe(arm_id, context, float(reward))

    def learn(
        self,
        arm_id: ArmId,
        context: Context,
        correct: float,
        cost_usd: float | None,
        propensity: float | None = None,
        pricing: Pricing | None = None,
    ) -> None:
        """The priced path: learn correctness and the call's cost (see ``RoutingPolicy``)."""
        self._observe(arm_id, context, float(correct))
        if cost_usd is not None:
            self._costs.observe(arm_id, cost_usd)

    def mean_costs(self) -> dict[ArmId, float]:
        """Each arm's mean cost over the calls :meth:`learn` was told the cost of."""
        return self._costs.means()

    # ------------------------------------------------------------------ estimates
    def _level(self, arm: ArmId, group: int) -> tuple[float, float, float]:
        """(mean, pulls, prior weight) of ``arm`` at the finest level known for ``group``."""
        n_a, s_a = self._sums.get((NO_GROUP, arm), (0.0, 0.0))
        m_a = (s_a + self.prior_mean) / (n_a + 1.0)
        if group == NO_GROUP:
            return m_a, n_a, 1.0
        n_g, s_g = self._sums.get((group, arm), (0.0, 0.0))
        w = self.prior_weight
        return (s_g + w * m_a) / (n_g + w), n_g, w

    def means(self, arm_ids: Sequence[ArmId], context: Context) -> dict[ArmId, float]:
        """Each arm's (shrunk) mean outcome for ``context``'s task."""
        g = self.group(context)
        return {a: self._level(a, g)[0] for a in arm_ids}

    def probabilities(
        self, arm_ids: Sequence[ArmId], context: Context, pricing: Pricing | None = None
    ) -> np.ndarray:
        """The distribution :meth:`choose` draws from (no draw made)."""
        if not arm_ids:
            raise ValueError("arm_ids is empty")
        if len(set(arm_ids)) != len(arm_ids):
            raise ValueError(f"duplicate arm ids in {list(arm_ids)!r}")
        for arm in arm_ids:
            if arm not in self._arms:
                self._arms.append(arm)
        g = self.group(context)
        levels = [self._level(a, g) for a in arm_ids]
        untaught = np.array([self._sums.get((NO_GROUP, a), (0.0,))[0] == 0 for a in arm_ids])
        if untaught.any():
            return greedy_mix(untaught, self.epsilon)
        score = np.array([m + self.alpha / np.sqrt(n + w) for m, n, w in levels])
        if pricing is not None:
            score = score - pricing.penalties(arm_ids, self.mean_costs())
        return greedy_mix(score == score.max(), self.epsilon)

    def choose(  # type: ignore[override]
        self, arm_ids: Sequence[ArmId], context: Context, pricing: Pricing | None = None
    ) -> Choice:
        p = self.probabilities(arm_ids, context, pricing)
        j = draw(p, self._rng.random())
        return Choice(arm=arm_ids[j], probabilities=dict(zip(arm_ids, p.tolist(), strict=True)))

    def choose_many(  # type: ignore[override]
        self, arm_ids: Sequence[ArmId], contexts: np.ndarray, pricing: Pricing | None = None
    ) -> list[Choice]:
        return [self.choose(arm_ids, row, pricing) for row in np.asarray(contexts)]

    # ------------------------------------------------------------------ arms, merge, state
    @property
    def arms(self) -> list[ArmId]:
        return list(self._arms)

    def remove_arm(self, arm_id: ArmId) -> None:
        if arm_id not in self._arms:
            raise KeyError(arm_id)
        self._arms.remove(arm_id)
        for key in [k for k in self._sums if k[1] == arm_id]:
            del self._sums[key]
        self._costs.forget(arm_id)

    def merge(self, other: ArmMeans) -> ArmMeans:
        """Summed counts and sums of both (``self``'s random state)."""
        self._merge_common(other)
        new = type(self)(**self._get_params())
        new._rng.bit_generator.state = self._rng.bit_generator.state
        new._n_updates = self._n_updates + other._n_updates
        new._arms = self._arms + [a for a in other._arms if a not in self._arms]
        for src in (self, other):
            for key, (n, s) in src._sums.items():
                acc = new._sums.setdefault(key, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + n, acc[1] + s
        new._costs = self._costs.merged(other._costs)
        return new

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        keys = list(self._sums)
        index = {a: i for i, a in enumerate(self._arms)}
        arrays = {
            "group": np.array([g for g, _ in keys], dtype=np.int64),
            "arm": np.array([index[a] for _, a in keys], dtype=np.int64),
            "sums": np.array([self._sums[k] for k in keys], dtype=np.float64).reshape(-1, 2),
            "cost": np.stack(self._costs.counts_and_totals(self._arms), axis=-1).astype(np.float64),
        }
        return {}, arrays

    def _load_state(self, meta: dict, arms: list, arrays: Mapping[str, np.ndarray]) -> None:
        self._arms = list(arms)
        for g, i, (n, s) in zip(arrays["group"], arrays["arm"], arrays["sums"], strict=True):
            self._sums[(int(g), arms[int(i)])] = [float(n), float(s)]
        cost = arrays["cost"].reshape(-1, 2)
        self._costs = RunningCosts.from_counts_and_totals(arms, cost[:, 0], cost[:, 1])
