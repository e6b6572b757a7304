"""Warm start from an outcomes file, and bandit replay of one.

* **Warm start** (the paper's *offline* setting, and the start of its *online* one): full
  information — on every training query, **every** arm learns its own reward
  ``r = 1[correct] − λ·cost/cost_unit`` (:func:`service.reward.reward`).
* **Cold start**: no warm start; the policy learns only from the arms it pulls.
* :func:`replay` runs the bandit protocol on an outcomes stream: choose an arm, observe only
  that arm's outcome, update. With a :class:`~service.pacing.BudgetPacer`, λ follows the
  pacer (budget mode); otherwise it is fixed.

    >>> import numpy as np
    >>> from service.outcomes import read_outcomes
    >>> from service.policy import LinUCB
    >>> records = read_outcomes("tests/policy/data/gsm8k_outcomes.jsonl")[:40]
    >>> contexts = np.random.default_rng(0).normal(size=(40, 8))   # stand-in embeddings
    >>> policy = LinUCB(seed=0)
    >>> warm_start(policy, records[:20], contexts[:20], lam=0.1, cost_unit=1e-3)
    40
    >>> result = replay(policy, records[20:], contexts[20:], lam=0.1, cost_unit=1e-3)
    >>> len(result.arms), policy.n_updates
    (20, 60)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.outcomes import OutcomeRecord
from service.pacing import BudgetPacer
from service.policy.base import RoutingPolicy
from service.reward import reward


def _check(records: Sequence[OutcomeRecord], contexts: np.ndarray) -> np.ndarray:
    contexts = np.asarray(contexts)
    if contexts.ndim != 2 or contexts.shape[0] != len(records):
        raise ValueError(
            f"need one context row per record: {len(records)} records, contexts {contexts.shape}"
        )
    return contexts


def warm_start(
    policy: RoutingPolicy,
    records: Sequence[OutcomeRecord],
    contexts: np.ndarray,
    lam: float,
    cost_unit: float,
) -> int:
    """Full-information updates: each arm of each record learns its own reward.

    ``contexts[i]`` is the context (embedding) of ``records[i]``. Arms are taken from the
    records (new ones get fresh statistics). A policy that ``learns_correctness`` learns each
    arm's correctness and cost instead (``lam`` then plays no part). Returns the number of
    updates applied.
    """
    contexts = _check(records, contexts)
    if policy.learns_correctness:  # the priced path: correctness and cost, no λ
        for i, record in enumerate(records):
            for arm, outcome in record.arms.items():
                failed = outcome.prediction is None
                cost = None if failed else outcome.cost_usd
                policy.learn(arm, contexts[i], float(record.correct(arm)), cost)
        return sum(len(r.arms) for r in records)
    rows: dict[str, list[int]] = {}
    rewards: dict[str, list[float]] = {}
    for i, record in enumerate(records):
        for arm, outcome in record.arms.items():
            rows.setdefault(arm, []).append(i)
            rewards.setdefault(arm, []).append(
                reward(record.correct(arm), outcome.cost_usd, lam, cost_unit)
            )
    # Arms learn independently, so per-arm batches in stream order equal the interleaved loop.
    for arm in rows:
        policy.update_many(arm, contexts[rows[arm]], rewards[arm])
    return sum(len(r) for r in rows.values())


@dataclass
class ReplayResult:
    """What happened on each query of a replay, in stream order."""

    arms: list[str] = field(default_factory=list)
    propensities: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    cost_usd: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    lams: list[float] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))

    @property
    def mean_cost_usd(self) -> float:
        return float(np.mean(self.cost_usd))


def replay(
    policy: RoutingPolicy,
    records: Sequence[OutcomeRecord],
    contexts: np.ndarray,
    lam: float = 0.0,
    cost_unit: float = 1.0,
    pacer: BudgetPacer | None = None,
    learn: bool = True,
) -> ReplayResult:
    """Bandit replay: per record choose among its arms, reveal the chosen arm's outcome only.

    With ``pacer`` the reward uses ``pacer.lam`` at the time of the query (budget mode) and the
    pacer observes each chosen cost; ``lam`` is then ignored. ``learn=False`` evaluates a
    frozen policy.
    """
    contexts = _check(records, contexts)
    out = ReplayResult()
    for record, x in zip(records, contexts, strict=True):
        arms = list(record.arms)
        choice = policy.choose(arms, x)
        current = pacer.lam if pacer is not None else lam
        ok, cost = record.correct(choice.arm), record.cost(choice.arm)
        r = reward(ok, cost, current, cost_unit)
        if learn:
            policy.update(choice.arm, x, r)
        if pacer is not None:
            pacer.observe(cost)
        out.arms.append(choice.arm)
        out.propensities.append(choice.propensity)
        out.correct.append(ok)
        out.cost_usd.append(cost)
        out.rewards.append(r)
        out.lams.append(current)
    return out
