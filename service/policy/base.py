"""The contract every routing policy meets.

A policy is a River contextual bandit (``pull`` / ``update``) that can also say *how likely*
each arm was, because the service logs the propensity of every decision::

    choice = policy.choose(["small", "large"], context)   # context: 1-d numpy array or dict
    choice.arm, choice.propensity, choice.probabilities
    policy.update(choice.arm, context, reward)

Policies are pure: no I/O. ``dumps``/``loads`` give a versioned byte serialisation that the
storage layer keeps in Postgres.

**Two ways to learn.** Every policy learns a scalar reward (``update(arm, context, r)`` with
``r = 1[correct] − λ·cost/cost_unit`` at the λ in force when the decision was made). A policy
whose ``learns_correctness`` is True also offers the *priced* path: it learns correctness and
cost apart and applies the price when choosing, so one learned state serves every λ::

    pricing = Pricing(lam=0.1, cost_unit=0.001, est_cost={"small": 2e-5, "large": 4e-4})
    choice = policy.choose(["small", "large"], context, pricing=pricing)
    policy.learn(choice.arm, context, correct=1.0, cost_usd=3.8e-4,
                 propensity=choice.propensity, pricing=pricing)   # the last two: optional

``est_cost`` is what each arm's call is expected to cost *before* it is made (for example each
arm's running mean of its own recorded costs: a projection of the log). Left out, the policy
uses the running means of the costs it was taught through ``learn``. A policy is taught
through one path only: mixing the two would mix correctness with rewards.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
from river.bandit.base import ContextualPolicy

from service.policy.checkpoint import PolicyState, dump_policy, register

Context = np.ndarray | Mapping[str, float]


@dataclass(frozen=True)
class Choice:
    """The arm a policy picked, with the full distribution it was drawn from."""

    arm: str
    probabilities: dict[str, float]
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def propensity(self) -> float:
        return self.probabilities[self.arm]


@dataclass(frozen=True)
class Pricing:
    """What a priced choice charges: ``λ · est_cost[arm] / cost_unit`` (in correct answers).

    ``est_cost`` maps arm → expected cost of its call in USD (None: the policy's own running
    means); an arm missing from it is charged nothing (a new arm is explored first anyway).

    >>> Pricing(0.1, 0.001, {"a": 0.0005}).penalties(["a", "b"]).tolist()
    [0.05, 0.0]
    """

    lam: float
    cost_unit: float
    est_cost: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.cost_unit <= 0:
            raise ValueError("cost_unit must be positive")

    def penalties(
        self, arm_ids: Sequence[str], fallback: Mapping[str, float] | None = None
    ) -> np.ndarray:
        """``λ·ĉ/cost_unit`` per arm, with ``ĉ`` from ``est_cost`` (else ``fallback``)."""
        return np.array(self.penalty_list(arm_ids, fallback), dtype=np.float64)

    def penalty_list(
        self, arm_ids: Sequence[str], fallback: Mapping[str, float] | None = None
    ) -> list[float]:
        """:meth:`penalties` as Python floats (what a single decision adds to its few
        scores): each is ``(λ·ĉ)/cost_unit`` in double precision, as numpy computes it."""
        costs = self.est_cost if self.est_cost is not None else (fallback or {})
        lam, unit = float(self.lam), float(self.cost_unit)
        return [lam * float(costs.get(a, 0.0)) / unit for a in arm_ids]


class RunningCosts:
    """Each arm's running cost sums: its mean recorded cost, and what its next call is expected
    to cost. The one keeper of those sums — the priced policies' own means
    (:class:`~service.policy.correctness_ucb.CorrectnessUCB`,
    :class:`~service.policy.arm_means.ArmMeans`) and the service's recorded costs
    (:class:`~service.pricing.CostEstimator`) — so that they update, merge, forget an arm and
    checkpoint alike. Sums only: two of them merge exactly, and a replay of the log rebuilds
    them bit for bit.

    A call's cost is the arm's prices times its tokens, and its input tokens grow with the
    prompt, so the estimate is each arm's least-squares line ``cost ≈ a + b·size`` over its
    calls (``size``: the prompt's length in characters), which is the arm's running mean cost
    when the sizes do not vary (or were not given).

    >>> costs = RunningCosts()
    >>> costs.observe("a", 0.002, 100); costs.observe("a", 0.004, 300)
    >>> costs.observe("b", 0.001)
    >>> {arm: round(c, 6) for arm, c in costs.estimate(200).items()}
    {'a': 0.003, 'b': 0.001}
    >>> round(costs.estimate(500)["a"], 6), round(costs.means()["a"], 6)
    (0.006, 0.003)

    Merged, forgotten, and kept as per-arm counts and totals (a policy's checkpoint arrays,
    for sums observed without sizes) or as JSON (all five sums):

    >>> other = RunningCosts(); other.observe("b", 0.003)
    >>> both = costs.merged(other)
    >>> both.means()["b"], both.arms
    (0.002, ['a', 'b'])
    >>> both.forget("a"); both.arms
    ['b']
    >>> n, total = both.counts_and_totals(["a", "b"])
    >>> n.tolist(), total.tolist()
    ([0, 2], [0.0, 0.004])
    >>> RunningCosts.from_counts_and_totals(["a", "b"], n, total).means()
    {'b': 0.002}
    >>> RunningCosts.from_dict(costs.to_dict()).estimate(500) == costs.estimate(500)
    True
    """

    def __init__(self, halflife: float | None = None) -> None:
        self.halflife = halflife
        # arm → [n, Σs, Σs², Σc, Σs·c]; Python floats: the same IEEE sums as numpy's, and
        # cheaper on the per-decision path (a priced choice reads every arm's mean)
        self._sums: dict[str, list[float]] = {}
        #: forget: each call weighs 2^(−1/halflife) less at every later call of its arm (drift:
        #: a price change is followed within about a half-life of calls); None: never
        self._decay = 1.0 if halflife is None else 0.5 ** (1.0 / halflife)

    @property
    def arms(self) -> list[str]:
        """The arms with recorded calls, in the order of their first."""
        return list(self._sums)

    def observe(self, arm: str, cost_usd: float, size: float = 0.0) -> None:
        """One call of ``arm`` that cost ``cost_usd``, for a prompt of ``size`` characters."""
        sums = self._sums.get(arm)
        if sums is None:
            sums = self._sums[arm] = [0.0, 0.0, 0.0, 0.0, 0.0]
        c, s = float(cost_usd), float(size)
        if self._decay != 1.0:
            sums[:] = [v * self._decay for v in sums]
        sums[0] += 1.0
        sums[1] += s
        sums[2] += s * s
        sums[3] += c
        sums[4] += s * c

    def means(self) -> dict[str, float]:
        """Each arm's mean recorded cost."""
        return {arm: v[3] / v[0] for arm, v in self._sums.items()}

    def estimate(self, size: float = 0.0) -> dict[str, float]:
        """Each arm's expected cost for a prompt of ``size`` characters (never below 0)."""
        out = {}
        for arm, (n, s1, s2, c1, sc) in self._sums.items():
            var = s2 / n - (s1 / n) ** 2
            mean_c = c1 / n
            if var <= 1e-9 * max(1.0, s2 / n):
                out[arm] = mean_c
                continue
            slope = (sc / n - (s1 / n) * mean_c) / var
            out[arm] = max(0.0, mean_c + slope * (size - s1 / n))
        return out

    def forget(self, arm: str) -> None:
        """Drop ``arm``'s sums (an arm removed from the config)."""
        self._sums.pop(arm, None)

    def merged(self, other: RunningCosts) -> RunningCosts:
        """The sums of both, arm by arm (``self``'s arms first)."""
        if other.halflife != self.halflife:
            raise ValueError("cannot merge running costs that forget at different half-lives")
        new = type(self)(self.halflife)
        for src in (self, other):
            for arm, sums in src._sums.items():
                acc = new._sums.get(arm)
                if acc is None:
                    new._sums[arm] = list(sums)
                else:
                    acc[:] = [a + b for a, b in zip(acc, sums, strict=True)]
        return new

    # ------------------------------------------------------------------ checkpoint forms
    def counts_and_totals(self, arms: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each of ``arms``' number of calls (int64) and sum of costs (float64), 0 for an arm
        without calls: the checkpoint arrays of sums observed without sizes and never
        forgotten (anything else raises ValueError: it would not load back the same)."""
        if self._decay != 1.0 or any(v[1] or v[2] or v[4] for v in self._sums.values()):
            raise ValueError("only sums without sizes or forgetting are counts and totals")
        rows = [self._sums.get(a, (0.0, 0.0, 0.0, 0.0)) for a in arms]
        return (
            np.array([r[0] for r in rows], dtype=np.int64),
            np.array([r[3] for r in rows], dtype=np.float64),
        )

    @classmethod
    def from_counts_and_totals(
        cls, arms: Sequence[str], counts: np.ndarray, totals: np.ndarray
    ) -> RunningCosts:
        """The sums :meth:`counts_and_totals` gave (arms with no call are left out)."""
        new = cls()
        for arm, n, total in zip(arms, counts.tolist(), totals.tolist(), strict=True):
            if n:
                new._sums[arm] = [float(n), 0.0, 0.0, float(total), 0.0]
        return new

    def to_dict(self) -> dict[str, list[float]]:
        """JSON state: each arm's five sums."""
        return {arm: list(v) for arm, v in self._sums.items()}

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Sequence[float]], halflife: float | None = None
    ) -> RunningCosts:
        """The sums :meth:`to_dict` gave, forgetting with ``halflife`` from now on."""
        new = cls(halflife)
        new._sums = {arm: [float(v) for v in sums] for arm, sums in data.items()}
        return new


# --------------------------------------------------------------------------------------------
# Shared machinery for the concrete policies (extension of the contract above).
# --------------------------------------------------------------------------------------------

ArmId = str


def mixed_greedy_probabilities(scores: np.ndarray, epsilon: float) -> np.ndarray:
    """ε-mixed argmax distribution, row-wise: ``(1-ε)·argmax(one-hot, ties split) + ε/k``.

    >>> mixed_greedy_probabilities(np.array([[1.0, 3.0, 3.0, 0.0]]), 0.2).round(3).tolist()
    [[0.05, 0.45, 0.45, 0.05]]
    """
    scores = np.atleast_2d(scores)
    ties = scores == scores.max(axis=1, keepdims=True)
    return greedy_mix(ties, epsilon)


def greedy_mix(greedy: np.ndarray, epsilon: float) -> np.ndarray:
    """``(1-ε)`` split evenly over the True entries of ``greedy`` (per row), plus ``ε/k``.

    >>> greedy_mix(np.array([True, False]), 0.5).tolist()
    [0.75, 0.25]
    """
    k = greedy.shape[-1]
    if greedy.ndim == 1:  # fast path (count_nonzero with an axis is slow on tiny arrays)
        n = np.count_nonzero(greedy)
    else:
        n = np.count_nonzero(greedy, axis=-1, keepdims=True)
    return greedy * ((1.0 - epsilon) / n) + epsilon / k


def greedy_mix_row(greedy: Sequence[bool], epsilon: float) -> list[float]:
    """:func:`greedy_mix` of one row, in Python floats: for a single decision over a few arms
    this skips numpy's per-call cost, and the floats are the same (``(1-ε)/n·1 + ε/k`` is
    ``(1-ε)/n + ε/k`` and ``(1-ε)/n·0 + ε/k`` is ``ε/k``, exactly).

    >>> greedy_mix_row([True, False], 0.5)
    [0.75, 0.25]
    """
    n = sum(greedy)
    if n == 0:  # no greedy entry (NaN scores): numpy's arithmetic, NaNs and all
        return greedy_mix(np.array(greedy, dtype=bool), epsilon).tolist()
    rest = epsilon / len(greedy)
    top = (1.0 - epsilon) / n + rest
    return [top if g else rest for g in greedy]


def row_max(values: Sequence[float]) -> float:
    """The largest of ``values`` as ``np.max`` gives it: NaN when any is NaN (Python's
    ``max`` would return a number that depends on where the NaN is).

    >>> row_max([1.0, 3.0, 2.0]), row_max([1.0, float("nan"), 2.0])
    (3.0, nan)
    """
    # a sum is NaN when a term is (or when it adds +inf to -inf, hence the second test)
    if math.isnan(sum(values)) and any(math.isnan(v) for v in values):
        return math.nan
    return max(values)


def check_ucb_params(alpha: float, epsilon: float, ridge: float = 1.0) -> None:
    """Raise ValueError unless ``alpha`` ≥ 0, ``epsilon`` in [0, 1] and ``ridge`` > 0."""
    if alpha < 0:
        raise ValueError("alpha must be >= 0")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError("epsilon must be in [0, 1]")
    if ridge <= 0:
        raise ValueError("ridge must be positive")


def draw(probabilities: np.ndarray | Sequence[float], u: float) -> int:
    """Index drawn from a probability vector (an array or a list of floats) with one uniform
    ``u`` in [0, 1) (inverse CDF).

    Arms with probability 0 are never drawn.

    >>> draw(np.array([0.0, 0.5, 0.5]), 0.49), draw([0.0, 0.5, 0.5], 0.5)
    (1, 2)
    """
    if isinstance(probabilities, np.ndarray):
        probabilities = probabilities.tolist()
    # Sequential running sums, as np.cumsum computes them (pure Python is faster for small k).
    cumulative = list(accumulate(probabilities))
    index = bisect_right(cumulative, u * cumulative[-1])
    return min(index, len(cumulative) - 1)


class RoutingPolicy(ContextualPolicy):
    """Base class of metallm policies: a River ``ContextualPolicy`` plus propensities.

    Subclasses implement ``choose``, ``update``, ``merge`` and the state hooks behind
    :meth:`checkpoint_state` (what :mod:`service.policy.checkpoint` writes). This class handles
    contexts (numpy vector or dict), the optional random projection, the seeded numpy
    ``Generator`` and the update counter.

    Dict contexts are mapped to a vector by the **sorted key order of the first dict seen**;
    that key list is frozen (and checkpointed). Later dicts may omit keys (read as 0.0) but
    may not add unknown keys.
    """

    #: Name used by ``make_policy`` and in the checkpoint header.
    kind: str = ""
    #: True when the policy offers the priced path (module docstring): ``learn`` and
    #: ``choose(..., pricing=...)``; False policies learn scalar rewards only.
    learns_correctness: bool = False

    def __init__(self, seed: int | None = None, project_dim: int | None = None) -> None:
        super().__init__(reward_obj=None, reward_scaler=None, burn_in=0)
        self.seed = seed
        self.project_dim = project_dim
        self._rng = np.random.default_rng(seed)
        self._n_updates = 0
        self._input_dim: int | None = None
        self._feature_names: list[str] | None = None
        self._projection: np.ndarray | None = None  # (input_dim, project_dim)
        #: Optional budget-mode λ controller (``service.pacing.BudgetPacer``); checkpointed.
        self.pacer = None
        #: The ``service.context.ContextBuilder`` whose contexts this policy learns from, with
        #: its running statistics (None: contexts come from elsewhere); checkpointed.
        self.context = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        register(cls)  # so that checkpoint.loads finds it by its kind

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._get_params().items())
        return f"{type(self).__name__}({params}) [arms={self.arms!r}, n_updates={self.n_updates}]"

    # ---------------------------------------------------------------- River interface
    def pull(self, arm_ids: Sequence[ArmId], context: Context | None = None) -> ArmId:  # type: ignore[override]
        """River-style pull: the arm of :meth:`choose`."""
        return self.choose(arm_ids, context).arm  # type: ignore[arg-type]

    def _pull(self, arm_ids, context):  # type: ignore[override]
        return self.choose(arm_ids, context).arm

    def reseed(self, seed: int | None) -> None:
        """Draw from a fresh generator seeded ``seed`` from now on. The statistics, and
        ``seed`` (it also fixes the random projection), stay as they are: instances that share
        one policy's statistics each draw their own exploration."""
        self._rng = np.random.default_rng(seed)

    @property
    def n_updates(self) -> int:
        """Number of ``update`` calls applied (merges add the other policy's count)."""
        return self._n_updates

    # ---------------------------------------------------------------- contract, per subclass
    def choose(self, arm_ids: Sequence[ArmId], context: Context) -> Choice:
        raise NotImplementedError

    def choose_many(self, arm_ids: Sequence[ArmId], contexts: np.ndarray) -> list[Choice]:
        """One :class:`Choice` per row of ``contexts`` (shape ``(n, d)``)."""
        return [self.choose(arm_ids, row) for row in np.asarray(contexts)]

    def update(self, arm_id: ArmId, context: Context, reward: float) -> None:  # type: ignore[override]
        raise NotImplementedError

    def update_many(self, arm_id: ArmId, contexts: np.ndarray, rewards: Sequence[float]) -> None:
        """Learn several (context, reward) pairs for one arm, in order."""
        if len(contexts) != len(rewards):
            raise ValueError(f"{len(contexts)} contexts but {len(rewards)} rewards")
        for x, r in zip(contexts, rewards, strict=True):
            self.update(arm_id, x, float(r))

    def learn(
        self,
        arm_id: ArmId,
        context: Context,
        correct: float,
        cost_usd: float | None,
        propensity: float | None = None,
        pricing: Pricing | None = None,
    ) -> None:
        """The priced path: learn whether ``arm_id`` was right (1.0/0.0, or a score in [0, 1])
        on ``context`` and what its call cost (None: not known, e.g. a failed call).

        ``propensity`` (the logged probability of ``arm_id`` at its decision) and ``pricing``
        (the λ and cost unit the decision was priced with, as stored on the decision) are for
        policies that score themselves off-policy (:mod:`service.policy.selector`); the others
        ignore them. Left out (e.g. a full-information warm start), the outcome teaches but
        scores nothing."""
        raise TypeError(f"{type(self).__name__} learns scalar rewards only (use update)")

    def merge(self, other):  # pragma: no cover - overridden
        raise NotImplementedError

    def remove_arm(self, arm_id: ArmId) -> None:
        raise NotImplementedError

    @property
    def arms(self) -> list[ArmId]:
        """Arms that currently have statistics, in insertion order."""
        raise NotImplementedError

    def dumps(self) -> bytes:
        """Versioned checkpoint; see :mod:`service.policy.checkpoint` for the format."""
        return dump_policy(self)

    # ---------------------------------------------------------------- checkpoint state
    def checkpoint_state(self) -> PolicyState:
        """Everything a checkpoint keeps of this policy: its kind, parameters, arms, update
        count, random state, context space, pacer and context builder, and its statistics."""
        params, param_arrays = self._checkpoint_params()
        meta, arrays = self._state()
        return PolicyState(
            kind=self.kind,
            params=params,
            arms=list(self.arms),
            n_updates=self._n_updates,
            rng=self._rng.bit_generator.state,
            input_dim=self._input_dim,
            feature_names=self._feature_names,
            projection=self._projection,
            meta=meta,
            arrays={**param_arrays, **arrays},
            pacer=getattr(self, "pacer", None),
            context=getattr(self, "context", None),
        )

    @classmethod
    def from_checkpoint_state(cls, state: PolicyState) -> RoutingPolicy:
        """The policy :meth:`checkpoint_state` gave ``state``: it makes the same choices."""
        policy = cls._from_checkpoint_params(state.params, state.arrays)
        policy._rng.bit_generator.state = state.rng
        policy._n_updates = state.n_updates
        policy._input_dim = state.input_dim
        policy._feature_names = state.feature_names
        policy._projection = state.projection
        if state.pacer is not None:
            policy.pacer = state.pacer
        if state.context is not None:
            policy.context = state.context
        policy._load_state(state.meta, state.arms, state.arrays)
        return policy

    # ---------------------------------------------------------------- hooks per subclass
    def _checkpoint_params(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Constructor kwargs as JSON, plus any that need to travel as arrays."""
        return self._get_params(), {}

    @classmethod
    def _from_checkpoint_params(cls, params: dict, arrays: dict[str, np.ndarray]):
        return cls(**params)

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Kind-specific state: JSON metadata and named arrays."""
        raise NotImplementedError

    def _load_state(self, meta: dict, arms: list, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers for subclasses
    @property
    def dim(self) -> int | None:
        """Dimension the statistics live in (after projection), or None before any context."""
        if self._input_dim is None:
            return None
        return self.project_dim or self._input_dim

    def _dict_to_vector(self, context: Mapping[str, float]) -> np.ndarray:
        if self._feature_names is None:
            self._feature_names = sorted(context)
        names = self._feature_names
        unknown = set(context).difference(names)
        if unknown:
            raise ValueError(f"context has keys never seen in the first context: {sorted(unknown)}")
        return np.array([context.get(name, 0.0) for name in names], dtype=np.float64)

    def _fix_input_dim(self, d: int) -> None:
        if self._input_dim is None:
            if self.project_dim is not None and not 0 < self.project_dim <= d:
                raise ValueError(f"project_dim must be in 1..{d}, got {self.project_dim}")
            self._input_dim = d
            if self.project_dim is not None:
                # Same law as river.preprocessing.GaussianRandomProjector: N(0, 1/n_components),
                # drawn from its own stream so the decision RNG is unaffected.
                proj_rng = np.random.default_rng(
                    None if self.seed is None else [self.seed, 0x9E3779B9]
                )
                self._projection = proj_rng.normal(
                    0.0, 1.0 / np.sqrt(self.project_dim), size=(d, self.project_dim)
                )
        elif d != self._input_dim:
            raise ValueError(f"context has dimension {d}, expected {self._input_dim}")

    def _vector(self, context: Context) -> np.ndarray:
        """A context as a float64 vector in the policy's (projected) space."""
        if (
            type(context) is np.ndarray
            and context.ndim == 1
            and context.shape[0] == self._input_dim
        ):  # fast path for the common case
            x = context if context.dtype == np.float64 else context.astype(np.float64)
            return x if self._projection is None else x @ self._projection
        if isinstance(context, Mapping):
            x = self._dict_to_vector(context)
        else:
            x = np.asarray(context, dtype=np.float64)
            if x.ndim != 1:
                raise ValueError(f"context must be 1-d, got shape {x.shape}")
        self._fix_input_dim(x.shape[0])
        if self._projection is not None:
            x = x @ self._projection
        return x

    def _matrix(self, contexts: np.ndarray) -> np.ndarray:
        """Rows of contexts as a float64 (n, dim) matrix in the policy's (projected) space."""
        X = np.asarray(contexts, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"contexts must be 2-d (n, d), got shape {X.shape}")
        self._fix_input_dim(X.shape[1])
        if self._projection is not None:
            X = X @ self._projection
        return X

    def _merge_common(self, other: RoutingPolicy) -> None:
        """Check that ``other`` is compatible (same type, params and context space)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        mine, theirs = self._get_params(), other._get_params()
        mine.pop("seed", None), theirs.pop("seed", None)  # the seed only drives the draws
        if mine != theirs:
            raise ValueError("cannot merge policies with different parameters")
        for attr in ("_input_dim", "_feature_names"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(f"cannot merge policies with different {attr.strip('_')}")
        if (
            self._projection is not None
            and other._projection is not None
            and not np.array_equal(self._projection, other._projection)
        ):
            raise ValueError("cannot merge policies with different projections")
