"""Replay benchmark: stream an outcomes file through the router with delayed rewards, next to
every baseline, and sweep λ for the accuracy–cost curve.

The protocol (:func:`simulate`), for each query ``t`` in file order:

1. the policy picks an arm from the query's context (``choose_many`` on one row, as the
   service's decider does), with λ in force now (fixed, or the budget pacer's); contexts are
   built by the service's :class:`~service.context.ContextBuilder` (:func:`stream_contexts`),
   each from the statistics of the queries before it;
2. if the recorded call of that arm failed (``prediction`` null) the policy learns at once that
   it was wrong at no cost — what the service does when an arm fails;
3. otherwise its reward ``1[correct] − λ·cost/cost_unit`` is revealed after the decision of
   query ``t + delay`` (``delay = 0``: right after its own decision), oldest first.

A policy that ``learns_correctness`` (the priced path of :mod:`service.policy.base`) is taught
correctness and cost instead of a reward, and chooses with ``Pricing(λ, cost_unit, est_cost)``
where ``est_cost`` is each arm's expected cost for the query's length, fitted on the calls the
router itself made (:class:`~service.policy.base.RunningCosts`; a call's cost is known when it
returns). Choosing never reads the recorded cost of an arm the router did not call; the
recorded cost only scores what it chose.

Methods measured on the same stream (the evaluation part: after the warm-start part, if any):
the router (``--policy``, learning online), every single arm, uniform random, always-cheapest,
the per-query oracle, the paper's LinUCB trained offline with full information and frozen, a
kNN router trained offline (both on the raw embeddings, as in the paper), and River's
non-contextual UCB and Thompson sampling (online, same delay). Offline methods train on the
warm-start part; in a cold start they are cross-fitted: the stream is cut into
``offline_folds`` blocks and each block is decided by a model trained on the others (they see
labels the online router never has in advance: a reference, not a peer).

    >>> import numpy as np
    >>> from service.outcomes import read_outcomes
    >>> records = read_outcomes("tests/policy/data/gsm8k_outcomes.jsonl")[:60]
    >>> contexts = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    >>> problem = Problem.from_records(records, contexts)
    >>> config = BenchConfig(delay=5, lam=0.1, lambdas=None)
    >>> result = run_bench(problem, config)
    >>> result.methods["oracle"]["accuracy"]["mean"] >= result.methods["router"]["accuracy"]["mean"]
    True
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evaluation import metrics
from evaluation.metrics import Point
from service.context import (
    DEFAULT_EMBEDDING,
    DEFAULT_FEATURE_BUCKETS,
    DEFAULT_TASK_BUCKETS,
    ContextBuilder,
    ContextError,
    ContextLayout,
    Feature,
)
from service.outcomes import DEFAULT_TASK, OutcomeRecord
from service.pacing import BudgetPacer
from service.policy import Pricing, RoutingPolicy, loads, make_policy
from service.policy.base import RunningCosts
from service.policy.conservative import Conservative, ConservativeGuard
from service.policy.warm_start import warm_start
from service.reward import reward

#: Default λ sweep, as the penalty of one average call of the most accurate arm (in units of
#: one correct answer): λ = κ · cost_unit / mean cost of that arm.
DEFAULT_PENALTIES = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5)

ROUTER = "router"
ORACLE = "oracle"


class BenchError(ValueError):
    """The outcomes cannot be benchmarked as given (the message says why)."""


def one_blas_thread() -> contextlib.AbstractContextManager:
    """The bandit's linear algebra is a stream of tiny products: more BLAS threads only fight
    over the cores (10–30× slower on a busy 2-core machine), and one thread also keeps the
    floating-point sums in the same order in every run."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of metallm
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# ------------------------------------------------------------------------------ the data
@dataclass
class Problem:
    """An outcomes file as arrays: per query ``t`` and arm ``j``, whether it was right, what it
    cost and whether the call failed; plus each query's context (what the router decides on)
    and embedding (what the offline baselines use; the contexts when not given)."""

    records: list[OutcomeRecord]
    arms: list[str]
    correct: np.ndarray  # (n, k) bool
    cost: np.ndarray  # (n, k) float
    failed: np.ndarray  # (n, k) bool
    contexts: np.ndarray  # (n, d) float32
    embeddings: np.ndarray  # (n, e) float32

    @classmethod
    def from_records(
        cls,
        records: Sequence[OutcomeRecord],
        contexts: np.ndarray,
        embeddings: np.ndarray | None = None,
    ) -> Problem:
        if len(records) < 2:
            raise BenchError("need at least 2 queries")
        contexts = np.ascontiguousarray(contexts, dtype=np.float32)
        if contexts.shape[0] != len(records):
            raise BenchError(f"{len(records)} records but {contexts.shape[0]} contexts")
        embeddings = (
            contexts if embeddings is None else np.ascontiguousarray(embeddings, dtype=np.float32)
        )
        if embeddings.shape[0] != len(records):
            raise BenchError(f"{len(records)} records but {embeddings.shape[0]} embeddings")
        arms = list(records[0].arms)
        for i, record in enumerate(records, start=1):
            if set(record.arms) != set(arms):
                raise BenchError(
                    f"line {i}: arms {sorted(record.arms)} differ from the first line's "
                    f"{sorted(arms)}; the benchmark needs every arm's outcome on every query"
                )
        correct = np.array([[r.correct(a) for a in arms] for r in records], dtype=bool)
        cost = np.array([[r.cost(a) for a in arms] for r in records], dtype=np.float64)
        failed = np.array(
            [[r.arms[a].prediction is None for a in arms] for r in records], dtype=bool
        )
        return cls(list(records), arms, correct, cost, failed, contexts, embeddings)

    @property
    def n(self) -> int:
        return len(self.records)

    def best_and_cheapest(self, start: int = 0) -> tuple[int, int]:
        """The arm indices of the most accurate arm (then the cheaper) and of the cheapest
        (then the more accurate), on queries ``start..n-1``."""
        acc = self.correct[start:].mean(axis=0)
        total = self.cost[start:].sum(axis=0)
        return int(np.lexsort((total, -acc))[0]), int(np.lexsort((-acc, total))[0])

    def rewards(self, lam: float, cost_unit: float) -> np.ndarray:
        """``1[correct] − λ·cost/cost_unit`` for every (query, arm): the reward we score with."""
        return self.correct.astype(np.float64) - lam * self.cost / cost_unit


# ------------------------------------------------------------------------------ settings
@dataclass
class BenchConfig:
    """What to run. ``budget`` (USD per query) replaces the fixed λ of the router and of the
    online baselines by a :class:`~service.pacing.BudgetPacer`; rewards are still *scored*
    with ``lam``. ``lambdas`` is the sweep grid (None: no sweep; empty: the default grid)."""

    delay: int = 100
    lam: float = 0.1
    cost_unit: float = 0.001
    budget: float | None = None
    budget_lr: float = 0.05
    warm_start: float = 0.0
    seeds: Sequence[int] = (0,)
    policy: str = "linucb"
    policy_params: dict[str, Any] = field(default_factory=dict)
    lambdas: Sequence[float] | None = ()
    knn_k: int = 10
    offline_folds: int = 5
    baselines: bool = True
    # the router's context (service.context; the service's METALLM_CONTEXT_* settings), with
    # metadata features ("KEY:categorical" / "KEY:numeric") that every task declares
    context_embedding: str = DEFAULT_EMBEDDING
    task_buckets: int = DEFAULT_TASK_BUCKETS
    feature_buckets: int = DEFAULT_FEATURE_BUCKETS
    features: Sequence[str] = ()
    # conservative mode (service.policy.conservative): every task's baseline arm and tolerance δ
    baseline: str | None = None
    tolerance: float = 0.05

    def __post_init__(self) -> None:
        if self.delay < 0:
            raise BenchError("delay must be >= 0")
        if not 0.0 <= self.warm_start < 1.0:
            raise BenchError("warm-start fraction must be in [0, 1)")
        if self.cost_unit <= 0:
            raise BenchError("cost unit must be positive")
        if not self.seeds:
            raise BenchError("need at least one seed")
        if self.knn_k < 1 or self.offline_folds < 2:
            raise BenchError("knn k must be >= 1 and offline folds >= 2")
        if not 0.0 <= self.tolerance < 1.0:
            raise BenchError("tolerance must be in [0, 1)")

        try:
            self.layout()
        except ContextError as exc:
            raise BenchError(str(exc)) from None

    def params(self, seed: int) -> dict[str, Any]:
        return {**self.policy_params, "seed": seed}

    def layout(self) -> ContextLayout:
        features = tuple(Feature.parse(f) for f in self.features)
        return ContextLayout(
            self.context_embedding, self.task_buckets, self.feature_buckets, features
        )

    def new_context(self) -> ContextBuilder:
        """A fresh builder of the router's contexts (every task declares every feature)."""
        return ContextBuilder(self.layout())

    def feature_kinds(self) -> dict[str, str]:
        return {f.key: f.kind for f in self.layout().features}

    def context_settings(self) -> dict[str, Any]:
        """The service settings (``Settings`` fields) that give the same context layout."""
        return {
            "context_embedding": self.context_embedding,
            "context_task_buckets": self.task_buckets,
            "context_feature_buckets": self.feature_buckets,
        }


def stream_contexts(
    records: Sequence[OutcomeRecord], embeddings: np.ndarray, builder: ContextBuilder
) -> np.ndarray:
    """The router's contexts of a stream, in order: each built from the statistics of the
    queries before it, then observed (:meth:`ContextBuilder.stream`; a bad metadata value is
    reported with its line)."""
    queries = [(r.task or DEFAULT_TASK, r.text, r.metadata) for r in records]
    try:
        return builder.stream(queries, embeddings)
    except ContextError as exc:
        raise BenchError(str(exc)) from None


def context_after(builder: ContextBuilder, records: Sequence[OutcomeRecord]) -> ContextBuilder:
    """``builder`` having observed ``records`` (the state a warm-started service starts in)."""
    for record in records:
        builder.observe(record.task or DEFAULT_TASK, len(record.text), record.metadata)
    return builder


# ------------------------------------------------------------------------------ the stream
@dataclass
class StreamResult:
    """What an online method did on each query of the evaluation part."""

    choices: np.ndarray  # arm index per query
    propensities: np.ndarray
    lams: np.ndarray  # λ in force at each decision


def simulate(
    problem: Problem,
    policy: RoutingPolicy,
    start: int,
    delay: int,
    lam: float,
    cost_unit: float,
    pacer: BudgetPacer | None = None,
    on_decision: Callable[[int], None] | None = None,
    guard: ConservativeGuard | None = None,
) -> StreamResult:
    """Run the delayed-reward bandit protocol (module docstring) on queries ``start..n-1``.

    The policy draws from its own RNG exactly as the service's decider does (one
    ``choose_many`` call per query), and learns in the order the service would. With a
    ``guard`` (conservative mode), a choice that could break its task's budget becomes the
    baseline, and the guard counts each decision and learns each outcome as the policy does.
    """
    arms = problem.arms
    index = {a: j for j, a in enumerate(arms)}
    X32 = problem.contexts
    X64 = X32.astype(np.float64)
    n_eval = problem.n - start
    choices = np.empty(n_eval, dtype=np.intp)
    props = np.empty(n_eval)
    lams = np.empty(n_eval)
    pending: deque[tuple[int, int, float, float]] = deque()
    priced = getattr(policy, "learns_correctness", False)
    # what the router knows of each arm's cost: its own calls (forgotten over time when the
    # policy follows drift)
    costs = RunningCosts(getattr(policy, "cost_halflife", None))
    sizes = [len(r.text) for r in problem.records]
    tasks = [r.task or DEFAULT_TASK for r in problem.records]

    def learn(s: int, j: int, lam_s: float, p: float) -> None:
        ok = bool(problem.correct[s, j])
        cost = float(problem.cost[s, j])
        if guard is not None:
            guard.learned(tasks[s], arms[j], float(ok), cost)
        if priced:  # with what the service stores on the decision: propensity and λ
            policy.learn(arms[j], X32[s], float(ok), cost, p, Pricing(lam_s, cost_unit))
        else:
            policy.update(arms[j], X32[s], reward(ok, cost, lam_s, cost_unit))

    for i, t in enumerate(range(start, problem.n)):
        lam_t = pacer.lam if pacer is not None else lam
        if priced:
            pricing = Pricing(lam_t, cost_unit, costs.estimate(sizes[t]))
            choice = policy.choose_many(arms, X64[t : t + 1], pricing=pricing)[0]
        else:
            choice = policy.choose_many(arms, X64[t : t + 1])[0]
        if guard is not None:
            guarding = Pricing(lam_t, cost_unit, costs.estimate(sizes[t]))
            choice = guard.guard(tasks[t], choice, guarding)
            guard.played(tasks[t], choice.arm)
        j = index[choice.arm]
        choices[i], props[i], lams[i] = j, choice.propensity, lam_t
        if problem.failed[t, j]:  # the service rewards a failed arm at decision time, cost 0
            if guard is not None:
                guard.learned(tasks[t], arms[j], 0.0, None)
            if priced:
                priced_at = Pricing(lam_t, cost_unit)
                policy.learn(arms[j], X32[t], 0.0, None, choice.propensity, priced_at)
            else:
                policy.update(arms[j], X32[t], reward(False, 0.0, lam_t, cost_unit))
        else:
            costs.observe(arms[j], float(problem.cost[t, j]), sizes[t])  # known on return
            pending.append((t, j, lam_t, choice.propensity))
        if pacer is not None:
            pacer.observe(float(problem.cost[t, j]))
        while pending and pending[0][0] <= t - delay:
            learn(*pending.popleft())
        if on_decision is not None:
            on_decision(t)
    while pending:
        learn(*pending.popleft())
    return StreamResult(choices, props, lams)


# ------------------------------------------------------------------------------ methods
def split(n: int, warm_fraction: float) -> int:
    """Index of the first evaluated query: the warm-start part is ``[0, start)``."""
    start = int(math.floor(warm_fraction * n))
    if start >= n - 1:
        raise BenchError("the warm-start part leaves fewer than 2 queries to evaluate")
    return start


def offline_splits(n: int, start: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, decided rows) pairs covering ``start..n-1``: the warm-start part when there
    is one, else contiguous cross-fitting blocks.

    >>> [(len(a), b.tolist()) for a, b in offline_splits(6, 0, 3)]
    [(4, [0, 1]), (4, [2, 3]), (4, [4, 5])]
    >>> [(a.tolist(), len(b)) for a, b in offline_splits(6, 2, 3)]
    [([0, 1], 4)]
    """
    if start > 0:
        return [(np.arange(start), np.arange(start, n))]
    blocks = np.array_split(np.arange(n), min(folds, n))
    return [(np.setdiff1d(np.arange(n), b), b) for b in blocks if len(b)]


def make_router(config: BenchConfig, seed: int) -> RoutingPolicy:
    """The router as the service builds it: the configured policy, given the context builder
    whose layout its contexts follow (a policy may shape its prior by that layout)."""
    policy = make_policy(config.policy, **config.params(seed))
    policy.context = config.new_context()
    return policy


def warmed(
    policy: RoutingPolicy, problem: Problem, rows: np.ndarray, lam: float, cost_unit: float
) -> RoutingPolicy:
    """``policy`` after a full-information warm start on ``rows``, through a checkpoint round
    trip (what the service restores), so both paths start from the same bytes."""
    if len(rows) == 0:
        return policy
    records = [problem.records[i] for i in rows]
    warm_start(policy, records, problem.contexts[rows], lam=lam, cost_unit=cost_unit)
    return loads(policy.dumps())


def run_online(
    problem: Problem,
    config: BenchConfig,
    policy: RoutingPolicy,
    start: int,
    lam: float,
) -> StreamResult:
    """Warm start ``policy`` on the first ``start`` queries (at ``lam``), then stream the rest."""
    policy = warmed(policy, problem, np.arange(start), lam, config.cost_unit)
    pacer = None
    if config.budget is not None:
        pacer = BudgetPacer(config.budget, config.cost_unit, lr=config.budget_lr, lam0=lam)
    guard = conservative_guard(problem, config, start)
    return simulate(problem, policy, start, config.delay, lam, config.cost_unit, pacer, guard=guard)


def conservative_guard(
    problem: Problem, config: BenchConfig, start: int
) -> ConservativeGuard | None:
    """Conservative mode's guard (None: off): every task's baseline is ``config.baseline``;
    its estimates start from the warm-start part's outcomes (full information), its budget
    from the first evaluated query."""
    if config.baseline is None:
        return None
    if config.baseline not in problem.arms:
        raise BenchError(f"baseline {config.baseline!r} is not an arm of the file")
    rule = Conservative(config.baseline, config.tolerance)
    guard = ConservativeGuard({r.task or DEFAULT_TASK: rule for r in problem.records})
    for i in range(start):
        task = problem.records[i].task or DEFAULT_TASK
        for j, arm in enumerate(problem.arms):
            failed = bool(problem.failed[i, j])
            cost = None if failed else float(problem.cost[i, j])
            guard.learned(task, arm, float(problem.correct[i, j] and not failed), cost)
    return guard


def offline_linucb_choices(
    problem: Problem, start: int, config: BenchConfig, lam: float, seed: int = 0
) -> np.ndarray:
    """The paper's LinUCB: trained offline with full information, then frozen (greedy, ε = 0)."""
    alpha = config.policy_params.get("alpha", 1.0) if config.policy == "linucb" else 1.0
    X64 = problem.embeddings.astype(np.float64)
    choices = np.empty(problem.n - start, dtype=np.intp)
    index = {a: j for j, a in enumerate(problem.arms)}
    for train, rows in offline_splits(problem.n, start, config.offline_folds):
        policy = make_policy("linucb", alpha=alpha, epsilon=0.0, seed=seed)
        records = [problem.records[i] for i in train]
        warm_start(policy, records, problem.embeddings[train], lam=lam, cost_unit=config.cost_unit)
        picks = policy.choose_many(problem.arms, X64[rows])
        choices[rows - start] = [index[c.arm] for c in picks]
    return choices


def knn_choices(
    problem: Problem, start: int, config: BenchConfig, lams: Sequence[float]
) -> dict[float, np.ndarray]:
    """A kNN router trained offline: per query, the arm with the best mean reward over its
    ``knn_k`` most similar training queries (cosine); ties go to the cheaper arm."""
    X = problem.embeddings.astype(np.float64)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    out = {lam: np.empty(problem.n - start, dtype=np.intp) for lam in lams}
    for train, rows in offline_splits(problem.n, start, config.offline_folds):
        k = min(config.knn_k, len(train))
        sims = X[rows] @ X[train].T
        nn = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        mean_cost = problem.cost[train].mean(axis=0)
        for lam in lams:
            R = problem.rewards(lam, config.cost_unit)[train]
            est = R[nn].mean(axis=1)  # (rows, arms)
            est = np.round(est, 12)
            best = est == est.max(axis=1, keepdims=True)
            out[lam][rows - start] = np.where(best, mean_cost, np.inf).argmin(axis=1)
    return out


# ------------------------------------------------------------------------------ scoring
def score(
    problem: Problem, start: int, choices: np.ndarray, lam: float, cost_unit: float
) -> dict[str, Any]:
    """Accuracy, total cost, mean reward, per-step rewards and arm shares of one run."""
    rows = np.arange(start, problem.n)
    correct = problem.correct[rows, choices]
    cost = problem.cost[rows, choices]
    rewards = correct.astype(np.float64) - lam * cost / cost_unit
    counts = np.bincount(choices, minlength=len(problem.arms))
    return {
        "accuracy": metrics.accuracy(correct),
        "total_cost": float(cost.sum()),
        "mean_reward": float(rewards.mean()),
        "rewards": rewards,
        "share": {a: float(c / len(rows)) for a, c in zip(problem.arms, counts, strict=True)},
    }


@dataclass
class BenchResult:
    """Everything a benchmark run measured (see :func:`run_bench`); ``to_json`` for the file."""

    n_queries: int
    start: int
    arms: list[str]
    config: dict[str, Any]
    best_arm: str
    cheapest_arm: str
    methods: dict[str, dict[str, Any]]
    cumulative_reward: dict[str, list[float]]
    sweep: dict[str, list[dict[str, float]]]
    curves: dict[str, dict[str, Any]]
    router_runs: dict[int, StreamResult]
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "n_queries": self.n_queries,
            "evaluated_from": self.start,
            "n_evaluated": self.n_queries - self.start,
            "arms": self.arms,
            "best_arm": self.best_arm,
            "cheapest_arm": self.cheapest_arm,
            "config": self.config,
            "methods": self.methods,
            "sweep": self.sweep,
            "curves": self.curves,
            "cumulative_reward": self.cumulative_reward,
            "timings_s": self.timings,
            **self.extra,
        }


def _summarise(
    runs: list[dict[str, Any]], oracle_rewards: np.ndarray, best_cost: float, kind: str
) -> dict[str, Any]:
    keys = ("accuracy", "total_cost", "mean_reward")
    out: dict[str, Any] = {"kind": kind, "runs": len(runs)}
    for key in keys:
        out[key] = metrics.mean_and_spread([r[key] for r in runs])
    out["cost_pct_of_best_arm"] = metrics.mean_and_spread(
        [metrics.cost_share(r["total_cost"], best_cost) for r in runs]
    )
    out["regret"] = metrics.mean_and_spread(
        [metrics.regret(oracle_rewards, r["rewards"]) for r in runs]
    )
    arms = runs[0]["share"].keys()
    out["share"] = {a: float(np.mean([r["share"][a] for r in runs])) for a in arms}
    return out


def sweep_lambdas(problem: Problem, start: int, config: BenchConfig) -> list[float]:
    """The λ grid: ``config.lambdas`` if given, else :data:`DEFAULT_PENALTIES` scaled so that
    κ is the penalty of one average call of the most accurate arm."""
    if config.lambdas:
        return sorted(float(v) for v in config.lambdas)
    rows = slice(start, problem.n)
    mean_cost = problem.cost[rows].mean(axis=0)
    best, _ = problem.best_and_cheapest(start)
    scale = config.cost_unit / mean_cost[best] if mean_cost[best] > 0 else 1.0
    return [round(k * scale, 6) for k in DEFAULT_PENALTIES]


def run_bench(
    problem: Problem,
    config: BenchConfig,
    progress: Callable[[str, int, int], None] | None = None,
) -> BenchResult:
    """Run the router and every baseline on ``problem`` and, if asked, the λ sweep.

    ``progress(stage, done, total)`` is called as runs finish.
    """
    with one_blas_thread():
        return _run_bench(problem, config, progress)


def _run_bench(
    problem: Problem,
    config: BenchConfig,
    progress: Callable[[str, int, int], None] | None,
) -> BenchResult:
    def tick(stage: str, done: int, of: int) -> None:
        if progress is not None:
            progress(stage, done, of)

    timings: dict[str, float] = {}
    start = split(problem.n, config.warm_start)
    best, cheapest = problem.best_and_cheapest(start)
    scores = _Scores(problem, start, config.lam, config.cost_unit)

    t0 = time.perf_counter()
    router_runs = _run_router(scores, config, tick)
    timings["router_per_seed"] = (time.perf_counter() - t0) / len(config.seeds)
    oracle_rewards = _add_arms_and_oracle(scores)
    if config.baselines:
        t0 = time.perf_counter()
        _run_baselines(scores, config, cheapest)
        timings["baselines"] = time.perf_counter() - t0
        tick("baselines", 1, 1)
    total = problem.cost[start:].sum(axis=0)
    methods = scores.summaries(oracle_rewards, float(total[best]))

    sweep: dict[str, list[dict[str, float]]] = {}
    curves: dict[str, dict[str, Any]] = {}
    if config.lambdas is not None:
        t0 = time.perf_counter()
        sweep = _sweep(problem, start, config, tick)
        timings["sweep"] = time.perf_counter() - t0
        curves = _curves(problem, start, sweep)

    return BenchResult(
        n_queries=problem.n,
        start=start,
        arms=problem.arms,
        config=_config_json(config),
        best_arm=problem.arms[best],
        cheapest_arm=problem.arms[cheapest],
        methods=methods,
        cumulative_reward=scores.cumulative(),
        sweep=sweep,
        curves=curves,
        router_runs=router_runs,
        timings=timings,
    )


@dataclass
class _Scores:
    """The scored runs of each method on the evaluation part (at ``lam``), by name, in the
    order the methods ran."""

    problem: Problem
    start: int
    lam: float
    cost_unit: float
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, kind: str, choices: np.ndarray) -> None:
        run = score(self.problem, self.start, choices, self.lam, self.cost_unit)
        self.runs.setdefault(name, []).append(run)
        self.kinds[name] = kind

    def summaries(self, oracle_rewards: np.ndarray, best_cost: float) -> dict[str, Any]:
        return {
            name: _summarise(runs, oracle_rewards, best_cost, self.kinds[name])
            for name, runs in self.runs.items()
        }

    def cumulative(self) -> dict[str, list[float]]:
        """Each method's cumulative reward, query by query (the mean over its runs)."""
        return {
            name: np.cumsum(np.mean([x["rewards"] for x in runs], axis=0)).round(6).tolist()
            for name, runs in self.runs.items()
        }


def _run_router(
    scores: _Scores, config: BenchConfig, tick: Callable[[str, int, int], None]
) -> dict[int, StreamResult]:
    """The router, once per seed: its runs by seed."""
    router_runs: dict[int, StreamResult] = {}
    for i, seed in enumerate(config.seeds):
        router = make_router(config, seed)
        result = run_online(scores.problem, config, router, scores.start, scores.lam)
        router_runs[seed] = result
        scores.add(ROUTER, "router", result.choices)
        tick("router", i + 1, len(config.seeds))
    return router_runs


def _add_arms_and_oracle(scores: _Scores) -> np.ndarray:
    """Every single arm, and the per-query oracle; returns the oracle's rewards."""
    problem, rows = scores.problem, np.arange(scores.start, scores.problem.n)
    R = problem.rewards(scores.lam, scores.cost_unit)[rows]
    oracle = metrics.oracle_choices(R, problem.cost[rows])
    for j, arm in enumerate(problem.arms):
        scores.add(f"arm: {arm}", "arm", np.full(len(rows), j))
    scores.add(ORACLE, "oracle", oracle)
    return R[np.arange(len(rows)), oracle]


def _run_baselines(scores: _Scores, config: BenchConfig, cheapest: int) -> None:
    """Always-cheapest, uniform random, the offline LinUCB and kNN routers, and River's UCB
    and Thompson sampling."""
    problem, start, lam = scores.problem, scores.start, scores.lam
    n_eval = problem.n - start
    scores.add("always-cheapest", "baseline", np.full(n_eval, cheapest))
    for seed in config.seeds:
        rng = np.random.default_rng([seed, 7])
        scores.add("random", "baseline", rng.integers(len(problem.arms), size=n_eval))
    scores.add("linucb-offline", "baseline", offline_linucb_choices(problem, start, config, lam))
    scores.add("knn-offline", "baseline", knn_choices(problem, start, config, [lam])[lam])
    for name, kind in (("river-ucb", "ucb"), ("river-thompson", "thompson")):
        for seed in config.seeds:
            policy = make_policy(kind, seed=seed)
            scores.add(name, "baseline", run_online(problem, config, policy, start, lam).choices)


def _sweep(
    problem: Problem, start: int, config: BenchConfig, tick: Callable[[str, int, int], None]
) -> dict[str, list[dict[str, float]]]:
    """The λ sweep: accuracy and cost at each λ of the grid, for the router and (with the
    baselines) the offline kNN and LinUCB routers."""
    grid = sweep_lambdas(problem, start, config)
    sweep = {ROUTER: _sweep_router(problem, start, config, grid, tick)}
    if config.baselines:
        sweep.update(_sweep_offline(problem, start, config, grid))
    return sweep


def _sweep_router(
    problem: Problem,
    start: int,
    config: BenchConfig,
    grid: list[float],
    tick: Callable[[str, int, int], None],
) -> list[dict[str, float]]:
    total_runs = len(grid) * len(config.seeds)
    points = []
    done = 0
    for value in grid:
        accs, costs = [], []
        for seed in config.seeds:
            result = run_online(problem, config, make_router(config, seed), start, value)
            s = score(problem, start, result.choices, value, config.cost_unit)
            accs.append(s["accuracy"])
            costs.append(s["total_cost"])
            done += 1
            tick("sweep", done, total_runs)
        points.append(_sweep_point(value, accs, costs))
    return points


def _sweep_offline(
    problem: Problem, start: int, config: BenchConfig, grid: list[float]
) -> dict[str, list[dict[str, float]]]:
    knn = knn_choices(problem, start, config, grid)
    sweep: dict[str, list[dict[str, float]]] = {"knn-offline": [], "linucb-offline": []}
    for value in grid:
        linucb = offline_linucb_choices(problem, start, config, value)
        for name, choices in (("knn-offline", knn[value]), ("linucb-offline", linucb)):
            s = score(problem, start, choices, value, config.cost_unit)
            sweep[name].append(_sweep_point(value, [s["accuracy"]], [s["total_cost"]]))
    return sweep


def _curves(
    problem: Problem, start: int, sweep: dict[str, list[dict[str, float]]]
) -> dict[str, dict[str, Any]]:
    """The curve metrics of each swept method, and of random mixing of the cheapest and the
    best arm (the line APGR 0.5 stands for)."""
    acc = problem.correct[start:].mean(axis=0)
    total = problem.cost[start:].sum(axis=0)
    best, cheapest = problem.best_and_cheapest(start)
    cheap_pt = Point(float(total[cheapest]), float(acc[cheapest]))
    best_pt = Point(float(total[best]), float(acc[best]))
    c_min, c_max = float(total.min()), float(total.max())
    curves = {
        name: curve_summary(
            [Point(p["total_cost"], p["accuracy"]) for p in points], cheap_pt, best_pt, c_min, c_max
        )
        for name, points in sweep.items()
    }
    curves["random-mix"] = curve_summary([cheap_pt, best_pt], cheap_pt, best_pt, c_min, c_max)
    return curves


def _sweep_point(lam: float, accs: list[float], costs: list[float]) -> dict[str, float]:
    a, c = metrics.mean_and_spread(accs), metrics.mean_and_spread(costs)
    return {
        "lambda": lam,
        "accuracy": a["mean"],
        "accuracy_std": a["std"],
        "total_cost": c["mean"],
        "total_cost_std": c["std"],
    }


def curve_summary(
    curve: list[Point], cheapest: Point, best: Point, c_min: float, c_max: float
) -> dict[str, Any]:
    """APGR, AIQ and the cost at 95 % of the best arm's accuracy (measured and interpolated,
    in USD and as a % of the best arm's cost) for one accuracy–cost curve."""
    target = 0.95 * best.accuracy
    measured = metrics.cost_at_accuracy(curve, target)
    hull = metrics.cost_at_accuracy(curve + [cheapest], target, interpolate=True)
    return {
        "apgr": metrics.apgr(curve, cheapest, best),
        "aiq": metrics.aiq(curve, c_min, c_max, anchor=cheapest),
        "target_accuracy": target,
        "cost_at_95": measured,
        "cost_at_95_pct": None if measured is None else metrics.cost_share(measured, best.cost),
        "cost_at_95_interpolated": hull,
        "cost_at_95_interpolated_pct": None
        if hull is None
        else metrics.cost_share(hull, best.cost),
    }


def _config_json(config: BenchConfig) -> dict[str, Any]:
    out = dict(config.__dict__)
    out["seeds"] = list(config.seeds)
    out["lambdas"] = None if config.lambdas is None else list(config.lambdas)
    out["features"] = list(config.features)
    out["context_layout"] = config.layout().spec
    return out
