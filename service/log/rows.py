"""The learning log's rows, typed: what the core reads from Postgres (plain frozen dataclasses,
no SQLAlchemy, so the projection and the label join can use them without a database).

    >>> FoundDecision.example().label is None
    True
    >>> AppliedReward(1, "q1", "cheap", np.zeros(2), 1.0, layout=None).layout
    'legacy'
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np

from service.context import LEGACY
from service.decision import Decision, arm_failed, bytes_to_vector


class Source(NamedTuple):
    """A label event's place in Kafka."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class AppliedReward:
    """A reward committed to the database, to be applied to the policy in ``seq`` order."""

    seq: int
    query_id: str
    arm: str
    context: np.ndarray
    reward: float
    #: the context's layout (``ContextLayout.spec``); a NULL ``context_layout`` is the legacy one
    layout: str | None = LEGACY
    #: seconds from the reward's transaction to when it was read from the log (None: not read)
    age_s: float | None = None
    #: what a policy that learns correctness learns from it (:func:`learned_outcome`): whether
    #: the call was right (None: a row from before, read from ``reward``) and what it cost
    #: (None: not known, the arm failed)
    correct: bool | None = None
    cost_usd: float | None = None
    #: the decision's logged probability of ``arm`` and the λ its choice was priced with
    #: (``decision_lambda``; None: not priced): what off-policy scoring needs (None: not scored)
    propensity: float | None = None
    lam: float | None = None
    #: the decision's task (None: not read): what conservative mode counts outcomes by
    task: str | None = None

    def __post_init__(self) -> None:
        if self.layout is None:
            object.__setattr__(self, "layout", LEGACY)

    def aged(self, age_s: float | None) -> AppliedReward:
        return replace(self, age_s=age_s)

    def correctness(self) -> float:
        """1.0 or 0.0: :attr:`correct`, or for a row without it whether ``reward`` is
        above 0.5 (``1 − λ·cost/cost_unit`` stays above it for any call worth making)."""
        if self.correct is not None:
            return float(self.correct)
        return float(self.reward > 0.5)


def learned_outcome(
    correct: bool | None, cost_usd: float | None, status: str, fallback_arm: str | None
) -> tuple[bool | None, float | None]:
    """What a reward of the log teaches a policy that learns correctness, from its decision's
    row alone (so every instance and every replay learns the same): a decision whose arm
    failed was rewarded wrong at no known cost, whatever its label later said; any other
    reward is the label's ``correct`` and the call's cost.

    >>> learned_outcome(True, 0.002, "ok", None), learned_outcome(True, 0.002, "ok", "strong")
    ((True, 0.002), (False, None))
    """
    if arm_failed(status, fallback_arm):
        return False, None
    return correct, cost_usd


@dataclass(frozen=True)
class FoundDecision:
    """A stored decision as a label is scored against it."""

    query_id: str
    arm: str
    prediction: str | None
    status: str
    cost_usd: float
    context: bytes
    context_layout: str | None
    label: str | None
    reward_seq: int | None
    decided_at: datetime
    #: the labels its query allows (the task's, or the query's ``options``); None: not known
    options: tuple[str, ...] | None = None
    #: the logged probability of its arm, and the λ its choice was priced with (None: not priced)
    propensity: float | None = None
    decision_lambda: float | None = None
    task: str | None = None

    @classmethod
    def of(cls, decision: Decision, reward_seq: int | None) -> FoundDecision:
        """A decision just inserted (unlabeled), rewarded already as ``reward_seq`` if any."""
        return cls(
            decision.query_id,
            decision.arm,
            decision.prediction,
            decision.status,
            decision.cost_usd,
            decision.context,
            decision.context_layout,
            None,
            reward_seq,
            decision.decided_at,
            tuple(decision.options) if decision.options else None,
            decision.propensity,
            decision.decision_lambda,
            decision.task,
        )

    def reward(self, seq: int, reward: float, correct: bool | None = None) -> AppliedReward:
        """Its reward, stored as ``reward_seq`` ``seq`` (``correct``: its label's verdict;
        None: its arm failed, rewarded at decision time)."""
        context = bytes_to_vector(self.context)
        if correct is None:
            correct_, cost = False, None
        else:
            correct_, cost = correct, self.cost_usd
        return AppliedReward(
            seq,
            self.query_id,
            self.arm,
            context,
            reward,
            self.context_layout,
            correct=correct_,
            cost_usd=cost,
            propensity=self.propensity,
            lam=self.decision_lambda,
            task=self.task,
        )

    @classmethod
    def example(cls, **changes: Any) -> FoundDecision:
        """A made-up decision (for examples and tests)."""
        return replace(cls.of(Decision.example(), None), **changes)


@dataclass(frozen=True)
class StoredQuery:
    """What identifies a query behind its id: task, text, label set and metadata."""

    task: str
    text: str
    options: tuple[str, ...]
    metadata: dict[str, Any] | None


@dataclass(frozen=True)
class PendingLabel:
    """A label kept until its decision is stored, with the further labels counted for it."""

    query_id: str
    label: str
    labeled_at: datetime | None
    duplicates: int = 0
    source: Source | None = None  # where the label came from, if known


@dataclass(frozen=True)
class RejectedLabel:
    """A label outside its decision's label set: not applied, recorded with the reason."""

    query_id: str
    label: str
    reason: str
    source: Source | None = None


@dataclass(frozen=True)
class ExpiredLabel:
    """A pending label dropped: no decision came for it in time."""

    query_id: str
    label: str
    received_at: datetime


@dataclass(frozen=True)
class ScoredLabel:
    """A label to store on its decision: with a new reward (``reward`` set), or only the label
    (the decision was rewarded when its arm failed)."""

    decision: FoundDecision
    label: str
    labeled_at: datetime | None
    correct: bool
    reward: float | None = None
    lam: float | None = None
    extra_duplicates: int = 0

    @property
    def query_id(self) -> str:
        return self.decision.query_id


@dataclass(frozen=True)
class StoredCheckpoint:
    """A ``policy_checkpoints`` row: a policy's state and the watermarks it was taken at."""

    id: int
    created_at: datetime
    policy: str
    n_updates: int
    reward_watermark: int
    decision_watermark: int
    state: bytes


@dataclass(frozen=True)
class ArmOutcomes:
    """Per arm, for the metrics: decisions with a label, of which correct, the mean reward."""

    arm: str
    labeled: int
    correct: int
    mean_reward: float | None
