"""Off-policy evaluation from logged decisions: what another policy, or another λ, would have
earned on the traffic the service really saw.

Every decision row logs the context ``x`` the policy saw, the arm ``a`` it drew, the
probability ``p`` it drew it with (``propensity``) and, once labeled, whether the answer was
correct and what it cost. For a target policy ``π`` (a distribution over arms given ``x``) and
a reward ``r = 1[correct] − λ·cost/cost_unit`` at any λ, with weights ``w = π(a|x) / p``:

* IPS (inverse propensity scoring): ``V = mean(w·r)`` — unbiased, can be noisy;
* SNIPS (self-normalised IPS): ``V = Σ w·r / Σ w`` — slightly biased, much steadier;
* DR (doubly robust): ``V = mean(Σ_a π(a|x)·q(x, a) + w·(r − q(x, a)))`` with a reward model
  ``q`` (ridge regression per arm of correctness and of cost on ``[x, 1]``, cross-fitted on two
  halves of the log), unbiased if either the propensities or the model are right.

Confidence intervals are normal approximations: ``V ± z·sd/√n`` of the per-row terms (for
SNIPS, of its linearisation ``w·(r − V)/mean(w)``).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> n = 4000
    >>> log = LoggedData.synthetic(n, rng)            # two arms, known truth
    >>> target = fixed_arm(log, "b")
    >>> est = estimate(log, target, lam=0.0, cost_unit=1.0)
    >>> truth = 0.7                                    # arm b is right 70 % of the time
    >>> all(e.low <= truth <= e.high for e in est.values())
    True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from statistics import NormalDist
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.context import LEGACY

log = logging.getLogger(__name__)


@dataclass
class LoggedData:
    """Labeled decisions as arrays; arm ``j`` is ``arms[j]``.

    ``candidates[i, j]`` says whether arm ``j`` could be chosen for row ``i`` (it is in the
    logged ``probabilities``); ``logged_probs`` is that whole distribution.
    """

    query_ids: list[str]
    arms: list[str]
    contexts: np.ndarray  # (n, d) float64
    actions: np.ndarray  # (n,) arm index
    propensities: np.ndarray  # (n,)
    logged_probs: np.ndarray  # (n, k)
    candidates: np.ndarray  # (n, k) bool
    correct: np.ndarray  # (n,) the outcome: 1.0 / 0.0, or a score in [0, 1]
    cost: np.ndarray  # (n,) USD
    logged_reward: np.ndarray  # (n,) as stored
    logged_lambda: np.ndarray  # (n,)
    policies: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.query_ids)

    def rewards(self, lam: float, cost_unit: float) -> np.ndarray:
        """The logged outcomes re-scored at ``lam``: ``1[correct] − λ·cost/cost_unit``."""
        return self.correct.astype(np.float64) - lam * self.cost / cost_unit

    @classmethod
    def synthetic(
        cls,
        n: int,
        rng: np.random.Generator,
        accuracy: Sequence[float] = (0.4, 0.7),
        costs: Sequence[float] = (0.0, 1.0),
        logging_probs: Sequence[float] = (0.8, 0.2),
    ) -> LoggedData:
        """A log where arm ``j`` is right with probability ``accuracy[j]`` and costs
        ``costs[j]``, drawn with the fixed ``logging_probs`` (for examples and tests)."""
        k = len(accuracy)
        arms = [chr(ord("a") + j) for j in range(k)]
        probs = np.tile(np.asarray(logging_probs, dtype=float), (n, 1))
        actions = np.array([rng.choice(k, p=p) for p in probs])
        correct = rng.random(n) < np.asarray(accuracy)[actions]
        cost = np.asarray(costs, dtype=float)[actions]
        return cls(
            query_ids=[f"s{i}" for i in range(n)],
            arms=arms,
            contexts=rng.normal(size=(n, 3)),
            actions=actions,
            propensities=probs[np.arange(n), actions],
            logged_probs=probs,
            candidates=np.ones((n, k), dtype=bool),
            correct=correct,
            cost=cost,
            logged_reward=correct.astype(float),
            logged_lambda=np.zeros(n),
        )


class NoLoggedData(ValueError):
    """No labeled decision with a propensity and a context to evaluate."""


def load_decisions(
    engine: Engine,
    since: datetime | None = None,
    until: datetime | None = None,
    policy: str | None = None,
) -> LoggedData:
    """Labeled decisions from the ``decisions`` table (SQLAlchemy), in decision order.

    A row counts when it has a propensity, a context and a reward: it was labeled, or its arm
    failed. A failed arm (an ``llm_error``, or a fallback answered) is scored as the service
    scores it: wrong, at no cost, whatever the label. Contexts of different layouts
    (``context_layout``) do not mix: only the rows in the layout of the newest row are read
    (a warning counts the others).
    """
    from service import storage

    d = storage.decisions
    stmt = (
        sa.select(
            d.c.query_id,
            d.c.arm,
            d.c.propensity,
            d.c.probabilities,
            d.c.context,
            d.c.correct,
            d.c.score,
            d.c.status,
            d.c.cost_usd,
            d.c.reward,
            d.c.reward_lambda,
            d.c.policy,
            d.c.fallback_arm,
            d.c.context_layout,
        )
        .where(d.c.propensity.is_not(None), d.c.context.is_not(None))
        .where(d.c.reward.is_not(None))
        .order_by(d.c.decided_at, d.c.query_id)
    )
    if since is not None:
        stmt = stmt.where(d.c.decided_at >= since)
    if until is not None:
        stmt = stmt.where(d.c.decided_at < until)
    if policy is not None:
        stmt = stmt.where(d.c.policy == policy)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    if not rows:
        raise NoLoggedData("no labeled decision with a propensity and a context")
    layout = rows[-1].context_layout
    kept = [r for r in rows if r.context_layout == layout]
    if len(kept) < len(rows):
        log.warning(
            "read the %d decisions of context layout %r, the newest; %d of other layouts skipped",
            len(kept),
            layout or LEGACY,
            len(rows) - len(kept),
        )
    rows = kept
    arms: dict[str, int] = {}
    for row in rows:
        for arm in [row.arm, *(row.probabilities or {})]:
            arms.setdefault(arm, len(arms))
    n, k = len(rows), len(arms)
    probs = np.zeros((n, k))
    for i, row in enumerate(rows):
        for arm, p in (row.probabilities or {row.arm: row.propensity}).items():
            probs[i, arms[arm]] = p
    contexts = np.stack([storage.bytes_to_vector(r.context) for r in rows]).astype(np.float64)
    failed = np.array([r.status == "llm_error" or r.fallback_arm is not None for r in rows])
    return LoggedData(
        query_ids=[r.query_id for r in rows],
        arms=list(arms),
        contexts=contexts,
        actions=np.array([arms[r.arm] for r in rows]),
        propensities=np.array([float(r.propensity) for r in rows]),
        logged_probs=probs,
        candidates=probs > 0,
        correct=np.where(failed, 0.0, [_outcome(r) for r in rows]),
        cost=np.where(failed, 0.0, [float(r.cost_usd or 0.0) for r in rows]),
        logged_reward=np.array([np.nan if r.reward is None else r.reward for r in rows]),
        logged_lambda=np.array(
            [np.nan if r.reward_lambda is None else r.reward_lambda for r in rows]
        ),
        policies=sorted({r.policy for r in rows if r.policy}),
    )


def _outcome(row: Any) -> float:
    """A logged decision's outcome: its score (a score event, an open task's check), else
    whether its label matched an answer (a failed or unparseable call is wrong)."""
    if row.score is not None:
        return float(row.score)
    return float(bool(row.correct) and row.status == "ok")


# ------------------------------------------------------------------------------ targets
def logged_policy(data: LoggedData) -> np.ndarray:
    """The logging policy itself (its logged distributions): estimates ≈ the observed mean."""
    return data.logged_probs.copy()


def uniform(data: LoggedData) -> np.ndarray:
    """Uniform over each row's candidate arms."""
    c = data.candidates.astype(float)
    return c / c.sum(axis=1, keepdims=True)


def fixed_arm(data: LoggedData, arm: str) -> np.ndarray:
    """Always ``arm``."""
    if arm not in data.arms:
        raise ValueError(f"unknown arm {arm!r}; logged arms: {', '.join(data.arms)}")
    pi = np.zeros((data.n, len(data.arms)))
    pi[:, data.arms.index(arm)] = 1.0
    return pi


def from_policy(data: LoggedData, policy) -> np.ndarray:
    """The distribution a (frozen) routing policy gives each row's context over its
    candidates — e.g. the service's latest checkpoint. The policy is not updated."""
    from evaluation.bench import one_blas_thread

    pi = np.zeros((data.n, len(data.arms)))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(data.n):
        groups.setdefault(tuple(np.flatnonzero(data.candidates[i])), []).append(i)
    for cand, rows in groups.items():
        names = [data.arms[j] for j in cand]
        with one_blas_thread():
            choices = policy.choose_many(names, data.contexts[rows])
        for i, choice in zip(rows, choices, strict=True):
            for arm, p in choice.probabilities.items():
                pi[i, data.arms.index(arm)] = p
    return pi


# ------------------------------------------------------------------------------ reward model
@dataclass
class RewardModel:
    """Cross-fitted ridge predictions of correctness and cost for every (row, arm)."""

    p_correct: np.ndarray  # (n, k)
    cost: np.ndarray  # (n, k)

    def q(self, lam: float, cost_unit: float) -> np.ndarray:
        return self.p_correct - lam * self.cost / cost_unit


def fit_reward_model(data: LoggedData, ridge: float = 1.0, folds: int = 2) -> RewardModel:
    """Per arm, ridge regressions of ``correct`` and ``cost`` on ``[x, 1]``; each row is
    predicted by models fitted on the other fold(s) (cross-fitting keeps DR honest). An arm
    with no logged row in the training folds falls back to the overall means."""
    n, k = data.n, len(data.arms)
    Z = np.hstack([data.contexts, np.ones((n, 1))])
    d = Z.shape[1]
    p_hat, c_hat = np.zeros((n, k)), np.zeros((n, k))
    fold_of = np.arange(n) % folds
    for f in range(folds):
        test, train = fold_of == f, fold_of != f
        if not train.any():
            train = test
        for j in range(k):
            rows = train & (data.actions == j)
            if rows.sum() == 0:
                p_hat[test, j] = data.correct[train].mean()
                c_hat[test, j] = data.cost[train].mean()
                continue
            A = Z[rows].T @ Z[rows] + ridge * np.eye(d)
            A[-1, -1] -= ridge - 1e-9  # do not shrink the intercept
            for target, out in (
                (data.correct[rows].astype(float), p_hat),
                (data.cost[rows], c_hat),
            ):
                beta = np.linalg.solve(A, Z[rows].T @ target)
                out[test, j] = Z[test] @ beta
    return RewardModel(np.clip(p_hat, 0.0, 1.0), np.maximum(c_hat, 0.0))


def greedy_target(data: LoggedData, model: RewardModel, lam: float, cost_unit: float) -> np.ndarray:
    """Deterministic router that picks, among each row's candidates, the arm with the best
    modelled reward at ``lam``: "what a router tuned for this λ would have earned"."""
    q = np.where(data.candidates, model.q(lam, cost_unit), -np.inf)
    pi = np.zeros_like(q)
    pi[np.arange(data.n), q.argmax(axis=1)] = 1.0
    return pi


# ------------------------------------------------------------------------------ estimators
@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float
    se: float

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "se": self.se}


def _interval(terms: np.ndarray, value: float, z: float) -> Estimate:
    """``value ± z·sd(terms)/√n``."""
    n = terms.size
    se = float(terms.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return Estimate(float(value), float(value - z * se), float(value + z * se), se)


def ips(r: np.ndarray, w: np.ndarray, z: float = 1.96) -> Estimate:
    """Inverse propensity scoring."""
    terms = w * r
    return _interval(terms, terms.mean(), z)


def snips(r: np.ndarray, w: np.ndarray, z: float = 1.96) -> Estimate:
    """Self-normalised IPS, with a delta-method interval."""
    if w.sum() <= 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan)
    value = float((w * r).sum() / w.sum())
    return _interval(w * (r - value) / w.mean(), value, z)


def doubly_robust(
    r: np.ndarray, w: np.ndarray, q_logged: np.ndarray, q_target: np.ndarray, z: float = 1.96
) -> Estimate:
    """Doubly robust: model value of the target plus the weighted residual of the log."""
    terms = q_target + w * (r - q_logged)
    return _interval(terms, terms.mean(), z)


def estimate(
    data: LoggedData,
    target: np.ndarray,
    lam: float,
    cost_unit: float,
    model: RewardModel | None = None,
    confidence: float = 0.95,
) -> dict[str, Estimate]:
    """IPS, SNIPS and DR estimates of the mean reward per query of ``target`` at ``lam``."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    r = data.rewards(lam, cost_unit)
    rows = np.arange(data.n)
    w = target[rows, data.actions] / data.propensities
    model = model or fit_reward_model(data)
    q = model.q(lam, cost_unit)
    return {
        "ips": ips(r, w, z),
        "snips": snips(r, w, z),
        "dr": doubly_robust(r, w, q[rows, data.actions], (target * q).sum(axis=1), z),
    }


def diagnostics(data: LoggedData, target: np.ndarray) -> dict[str, float]:
    """Effective sample size of the weights, their max, and the target's probability mass on
    arms the log never offered (which no estimator can see)."""
    rows = np.arange(data.n)
    w = target[rows, data.actions] / data.propensities
    unsupported = float((target * ~data.candidates).sum(axis=1).mean())
    return {
        "n": float(data.n),
        "ess": float(w.sum() ** 2 / (w**2).sum()) if (w**2).sum() > 0 else 0.0,
        "max_weight": float(w.max()),
        "unsupported_mass": unsupported,
    }


def evaluate_targets(
    data: LoggedData,
    targets: dict[str, np.ndarray | str],
    lams: Sequence[float],
    cost_unit: float,
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """Every target at every λ. A target given as the string ``"greedy"`` is rebuilt for each
    λ (:func:`greedy_target`)."""
    model = fit_reward_model(data)
    out = []
    for lam in lams:
        observed = float(data.rewards(lam, cost_unit).mean())
        for name, target in targets.items():
            pi = greedy_target(data, model, lam, cost_unit) if isinstance(target, str) else target
            est = estimate(data, pi, lam, cost_unit, model, confidence)
            out.append(
                {
                    "target": name,
                    "lambda": lam,
                    "observed_mean_reward": observed,
                    **{k: v.to_json() for k, v in est.items()},
                    **diagnostics(data, pi),
                }
            )
    return out
