"""The learning log's rows, typed: what the core, the metrics and the HTTP door read from
Postgres (plain frozen dataclasses, no SQLAlchemy, so the projection and the label join can use
them without a database).

    >>> FoundDecision.example().label is None
    True
    >>> AppliedReward(1, "q1", "cheap", np.zeros(2), 1.0, layout=None).layout
    'legacy'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
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
    #: the call was right (None: a row from before, read from ``reward``, or scored), what it
    #: cost (None: not known, the arm failed) and its score in [0, 1] (None: a label's verdict)
    correct: bool | None = None
    cost_usd: float | None = None
    score: float | None = None
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
        """The outcome learnt: :attr:`score` (a fraction in [0, 1]) when scored, else 1.0 or
        0.0: :attr:`correct`, or for a row without it whether ``reward`` is above 0.5
        (``1 − λ·cost/cost_unit`` stays above it for any call worth making).

        >>> AppliedReward(1, "q", "a", np.zeros(1), 0.4, score=0.5, correct=None).correctness()
        0.5
        """
        if self.score is not None:
            return float(self.score)
        if self.correct is not None:
            return float(self.correct)
        return float(self.reward > 0.5)


def learned_outcome(
    correct: bool | None,
    cost_usd: float | None,
    status: str,
    fallback_arm: str | None,
    score: float | None = None,
) -> tuple[bool | None, float | None, float | None]:
    """What a reward of the log teaches a policy that learns correctness, from its decision's
    row alone (so every instance and every replay learns the same): a decision whose arm
    failed was rewarded wrong at no known cost, whatever its feedback later said; any other
    reward is the feedback's ``correct``, the call's cost and the feedback's ``score``.

    >>> learned_outcome(True, 0.002, "ok", None), learned_outcome(True, 0.002, "ok", "strong")
    ((True, 0.002, None), (False, None, None))
    >>> learned_outcome(None, 0.002, "ok", None, score=0.25)
    (None, 0.002, 0.25)
    """
    if arm_failed(status, fallback_arm):
        return False, None, None
    return correct, cost_usd, score


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
    #: the labels its query allows (the task's, or the query's ``options``); None: not known,
    #: or none (an open task)
    options: tuple[str, ...] | None = None
    task: str = ""
    #: the answer's text (``raw_output``): what an open task's check scores
    answer: str | None = None
    #: the score of its feedback, once it came (a score event, or an open task's check)
    score: float | None = None

    #: the logged probability of its arm, and the λ its choice was priced with (None: not priced)
    propensity: float | None = None
    decision_lambda: float | None = None

    @property
    def labeled(self) -> bool:
        """Whether its feedback came (a label or a score): the first one wins."""
        return self.label is not None or self.score is not None

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
            decision.task,
            decision.raw_output,
            propensity=decision.propensity,
            decision_lambda=decision.decision_lambda,
        )

    def reward(
        self, seq: int, reward: float, correct: bool | None = None, score: float | None = None
    ) -> AppliedReward:
        """Its reward, stored as ``reward_seq`` ``seq`` (``correct``: its label's verdict,
        ``score``: its score; both None: its arm failed, rewarded at decision time)."""
        context = bytes_to_vector(self.context)
        if correct is None and score is None:
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
            score=score,
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
    """A label kept until its decision is stored, with the further copies counted for it
    (labels that say the same: another feedback for the query waits beside it)."""

    query_id: str
    label: str | None
    labeled_at: datetime | None
    duplicates: int = 0
    source: Source | None = None  # where the label came from, if known
    score: float | None = None  # a score instead of a label
    id: int | None = None  # its row in pending_labels, once stored (in arrival order)


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
    label: str | None
    received_at: datetime


@dataclass(frozen=True)
class ScoredLabel:
    """Feedback to store on its decision: with a new reward (``reward`` set), or only the
    feedback (the decision was rewarded when its arm failed). ``correct``: the label's verdict
    (None for a score); ``score``: a score given, or an open task's check of its label."""

    decision: FoundDecision
    label: str | None
    labeled_at: datetime | None
    correct: bool | None
    reward: float | None = None
    lam: float | None = None
    extra_duplicates: int = 0
    score: float | None = None

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


@dataclass(frozen=True)
class PublicDecision:
    """A decision as an HTTP client is shown it (``GET /v1/decisions/{id}``, an answer's
    ``metallm`` field): its public columns, not its context, seed or sequence numbers.

    >>> shown = PublicDecision.of(Decision.example()).json()
    >>> shown["decided_at"], shown["label"], shown["duplicate_labels"]
    ('2026-01-01 00:00:00+00:00', None, 0)
    """

    query_id: str
    task: str
    text: str
    options: list[str]
    metadata: dict[str, Any] | None
    sent_at: datetime | None
    decided_at: datetime
    arm: str
    propensity: float
    probabilities: dict[str, float]
    policy: str
    status: str
    prediction: str | None
    raw_output: str | None
    error: str | None
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: float
    latency_ms: float | None
    attempts: int
    fallback_arm: str | None
    instance: str | None
    #: its feedback, once it came
    label: str | None = None
    correct: bool | None = None
    score: float | None = None
    reward: float | None = None
    labeled_at: datetime | None = None
    duplicate_labels: int = 0

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PublicDecision:
        """The public view of a ``decisions`` row (any mapping with :data:`PUBLIC_COLUMNS`)."""
        return cls(**{name: row[name] for name in PUBLIC_COLUMNS})

    @classmethod
    def of(cls, decision: Decision) -> PublicDecision:
        """A decision just called for (no feedback yet), as the pipeline made it: its answer
        and error whole, as the call returned them (the row stores them capped)."""
        return cls(**{name: getattr(decision, name) for name in _DECIDED_COLUMNS})

    def json(self) -> dict[str, Any]:
        """Its JSON form (``GET /v1/decisions/{id}``): the columns in order, a timestamp as
        ``str`` prints it (``2026-01-01 12:00:00.250000+00:00``)."""
        values = {name: getattr(self, name) for name in PUBLIC_COLUMNS}
        return {k: str(v) if isinstance(v, datetime) else v for k, v in values.items()}


#: the columns of a decision an HTTP client is shown, in the order it is shown them
PUBLIC_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(PublicDecision))
#: those that come with its feedback, and those it has from its call
_FEEDBACK_COLUMNS = ("label", "correct", "score", "reward", "labeled_at", "duplicate_labels")
_DECIDED_COLUMNS = tuple(name for name in PUBLIC_COLUMNS if name not in _FEEDBACK_COLUMNS)
