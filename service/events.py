"""The public event schemas: what users publish and what the service publishes back.

Events are UTF-8 JSON; the Kafka key is the ``query_id``.

    >>> raw = b'{"query_id": "q1", "text": "Great film!", "task": "sentiment"}'
    >>> QueryEvent.from_bytes(raw).task
    'sentiment'
"""

from __future__ import annotations

import base64
import json
import math
from datetime import UTC, datetime
from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

MAX_TEXT_CHARS = 32_768
MAX_DEPTH = 64  # nesting of ``metadata``


class InvalidEvent(ValueError):
    """An event that cannot be processed; the message is the reason stored in the DLQ."""


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> Self:
        if raw is None:
            raise InvalidEvent("empty message (null value)")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidEvent(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
        except json.JSONDecodeError as exc:
            where = f"line {exc.lineno} column {exc.colno}"
            raise InvalidEvent(f"not JSON: {exc.msg} at {where}") from None
        except RecursionError:
            raise InvalidEvent(f"nested deeper than {MAX_DEPTH} levels") from None
        if not isinstance(data, dict):
            raise InvalidEvent(f"expected a JSON object, got {type(data).__name__}")
        return cls.from_fields(data)

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Self:
        """The event of parsed JSON fields (an HTTP body's, say), checked as
        :meth:`from_bytes` checks one; :class:`InvalidEvent` with the reason."""
        try:
            event = cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidEvent(describe_validation_error(exc)) from None
        for name in type(event).model_fields:
            problem = unstorable(getattr(event, name))
            if problem:
                raise InvalidEvent(f"{name}: {problem}")
        return event

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode("utf-8")


def unstorable(value: Any) -> str | None:
    """Why Postgres could not store ``value`` (a NUL character, an unpaired surrogate, NaN or
    Infinity, nesting deeper than :data:`MAX_DEPTH`), or None. JSON allows all of these, and
    an event carrying one would otherwise fail every time it is stored.

    >>> unstorable({"a": ["ok", 1.5]}) is None
    True
    >>> unstorable({"a": "x\\x00y"})
    'contains a NUL character'
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(item, str):
            if "\x00" in item:
                return "contains a NUL character"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "contains an unpaired surrogate"
        elif isinstance(item, float) and not math.isfinite(item):
            return "NaN and Infinity are not JSON numbers"
        elif isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)
    return None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(event)"
        parts.append(f"{key}: {err['msg']}")
    return "; ".join(parts)


class QueryEvent(_Event):
    """A query to route. ``options`` overrides the task's label set for this query."""

    query_id: str = Field(min_length=1, max_length=128)
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    task: str = Field(min_length=1, max_length=128)
    options: list[str] | None = Field(None, min_length=2, max_length=64)
    metadata: dict[str, Any] | None = None
    sent_at: datetime | None = None

    @field_validator("options")
    @classmethod
    def _options_distinct(cls, options: list[str] | None) -> list[str] | None:
        if options is None:
            return None
        if any(not o.strip() for o in options):
            raise ValueError("options must be non-empty strings")
        if len(set(options)) != len(options):
            raise ValueError("options must be distinct")
        return options


class LabelEvent(_Event):
    """The feedback for a query, published any time after (or even before) the query: its
    ground truth ``label``, or a ``score`` in [0, 1] of the answer served (exactly one).

    >>> LabelEvent.from_bytes(b'{"query_id": "q1", "score": 0.75}').score
    0.75
    >>> def reason(raw: bytes) -> str:
    ...     try:
    ...         return str(LabelEvent.from_bytes(raw))
    ...     except InvalidEvent as exc:
    ...         return str(exc)
    >>> reason(b'{"query_id": "q1", "score": 1.5}')
    'score: Input should be less than or equal to 1'
    >>> reason(b'{"query_id": "q1", "label": "a", "score": 1}')[:60]
    '(event): Value error, a label event has exactly one of label'
    """

    query_id: str = Field(min_length=1, max_length=128)
    label: str | None = Field(None, min_length=1, max_length=1024)
    score: float | None = Field(None, ge=0, le=1, strict=True)
    labeled_at: datetime | None = None

    @model_validator(mode="before")
    @classmethod
    def _label_or_score_given(cls, data: Any) -> Any:
        """Neither: told as a missing ``label`` (the field most events carry)."""
        if isinstance(data, dict) and data.get("label") is None and data.get("score") is None:
            missing = InitErrorDetails(type="missing", loc=("label",), input=data)
            raise ValidationError.from_exception_data(cls.__name__, [missing])
        return data

    @model_validator(mode="after")
    def _not_both(self) -> LabelEvent:
        if self.label is not None and self.score is not None:
            raise ValueError("a label event has exactly one of label and score, not both")
        return self


class DecisionEvent(_Event):
    """Published to the decisions topic after each decision is stored. ``answer`` is what the
    model returned (the row's ``raw_output``, as stored), ``error`` why the call failed; both
    are left out of the JSON when there is none."""

    query_id: str
    task: str
    arm: str
    propensity: float
    probabilities: dict[str, float]
    prediction: str | None
    status: str
    cost_usd: float
    latency_ms: float | None
    decided_at: datetime
    attempts: int = 1
    fallback_arm: str | None = None
    answer: str | None = None
    error: str | None = None


def dlq_record(
    raw_key: bytes | None,
    raw_value: bytes | None,
    reason: str,
    topic: str,
    partition: int,
    offset: int,
) -> bytes:
    """The JSON body sent to the dead-letter topic for an event that was rejected."""

    def b64(data: bytes | None) -> str | None:
        return None if data is None else base64.b64encode(data).decode("ascii")

    return json.dumps(
        {
            "reason": reason,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "key_b64": b64(raw_key),
            "value_b64": b64(raw_value),
            "failed_at": datetime.now(UTC).isoformat(),
        }
    ).encode("utf-8")
