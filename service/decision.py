"""One decision, typed: what the pipeline decides, the ``decisions`` row stores, the decision
event tells and the learning log records.

    >>> d = Decision.example()
    >>> d.event().arm, d.row()["context_layout"], d.logged(7).n_chars
    ('cheap', 'legacy', 5)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import numpy as np

from service.events import DecisionEvent

#: the most characters of an answer (``raw_output``) and of an ``error`` a decision row stores:
#: the rest is cut and :data:`CUT_MARK` says so
MAX_STORED_CHARS = 16_384
CUT_MARK = " […]"


def capped(text: str | None, limit: int = MAX_STORED_CHARS) -> str | None:
    """``text`` as a row stores it: at most ``limit`` characters, the cut marked.

    >>> capped("short"), capped("x" * 10, limit=8)
    ('short', 'xxxx […]')
    """
    if text is None or len(text) <= limit:
        return text
    return text[: limit - len(CUT_MARK)] + CUT_MARK


def vector_to_bytes(vector: np.ndarray) -> bytes:
    """Contexts are stored as little-endian float32."""
    return np.asarray(vector, dtype="<f4").tobytes()


def bytes_to_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")


def arm_failed(status: str, fallback_arm: str | None) -> bool:
    """Whether a stored decision's chosen arm failed (whatever a fallback then did): such a
    decision is rewarded at decision time, wrong at no cost.

    >>> arm_failed("ok", None), arm_failed("ok", "strong"), arm_failed("llm_error", None)
    (False, True, True)
    """
    return status == "llm_error" or fallback_arm is not None


def cost_unknown(status: str, fallback_arm: str | None) -> bool:
    """Whether a stored decision's call tells nothing of its arm's cost: the arm failed, or
    refused the prompt as longer than its context window.

    >>> cost_unknown("input_too_long", None), cost_unknown("parse_error", None)
    (True, False)
    """
    return arm_failed(status, fallback_arm) or status == "input_too_long"


@dataclass(frozen=True)
class LoggedDecision:
    """What the context builder and the budget pacer learn from each stored decision, in
    ``decision_seq`` order."""

    seq: int
    cost_usd: float
    task: str
    n_chars: int
    metadata: dict[str, Any] | None
    #: the arm called, its output tokens, and whether its call tells nothing of its cost
    #: (:func:`cost_unknown`): the inputs of the cost estimates
    arm: str = ""
    output_tokens: int | None = None
    cost_unknown: bool = False


@dataclass(frozen=True)
class Decision:
    """A ``decisions`` row as the pipeline writes it (the columns are docs/interface.md's
    table; the label, the reward and the sequence numbers are set later, by Postgres and the
    learner)."""

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
    answer_scores: dict[str, float] | None
    arm_scores: dict[str, float] | None
    embedding_model: str
    context: bytes  # little-endian float32 (vector_to_bytes)
    context_layout: str
    kafka_partition: int | None
    kafka_offset: int | None
    instance: str | None
    rng_seed: int | None
    #: the λ the choice was priced at (a policy that learns correctness; None: not priced)
    decision_lambda: float | None = None
    #: the chosen arm's call cost as estimated before the call (None: not priced)
    estimated_cost_usd: float | None = None

    def row(self) -> dict[str, Any]:
        """The row to insert, column by column (the answer and the error :func:`capped`)."""
        row = {name: getattr(self, name) for name in COLUMNS}
        row["raw_output"] = capped(self.raw_output)
        row["error"] = capped(self.error)
        return row

    def event(self) -> DecisionEvent:
        """The decision event published once the row is stored."""
        return event_of(self.row())

    def logged(self, seq: int) -> LoggedDecision:
        """Its entry in the decision log, stored as ``decision_seq`` ``seq``."""
        return LoggedDecision(
            seq,
            float(self.cost_usd),
            self.task,
            len(self.text),
            self.metadata,
            self.arm,
            self.output_tokens,
            cost_unknown(self.status, self.fallback_arm),
        )

    @classmethod
    def example(cls, **changes: Any) -> Decision:
        """A made-up decision (for examples and tests)."""
        values: dict[str, Any] = {
            "query_id": "q1",
            "task": "sentiment",
            "text": "great",
            "options": ["positive", "negative"],
            "metadata": None,
            "sent_at": None,
            "decided_at": datetime(2026, 1, 1, tzinfo=UTC),
            "arm": "cheap",
            "propensity": 0.5,
            "probabilities": {"cheap": 0.5, "strong": 0.5},
            "policy": "linucb",
            "status": "ok",
            "prediction": "positive",
            "raw_output": "positive",
            "error": None,
            "input_tokens": 10,
            "output_tokens": 1,
            "cost_usd": 0.0001,
            "latency_ms": 12.0,
            "attempts": 1,
            "fallback_arm": None,
            "answer_scores": None,
            "arm_scores": None,
            "embedding_model": "m",
            "context": b"\x00\x00\x80?",
            "context_layout": "legacy",
            "kafka_partition": 0,
            "kafka_offset": 0,
            "instance": "a",
            "rng_seed": 1,
        }
        return cls(**{**values, **changes})


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Decision))
#: The columns a decision event is made of (a subset of the row's)
EVENT_COLUMNS: tuple[str, ...] = tuple(DecisionEvent.model_fields)


def event_of(row: Mapping[str, Any]) -> DecisionEvent:
    """The decision event of a stored row (any mapping with :data:`EVENT_COLUMNS`)."""
    values = {name: row[name] for name in EVENT_COLUMNS if name in row}
    values["attempts"] = values.get("attempts") or 1
    return DecisionEvent(**values)
