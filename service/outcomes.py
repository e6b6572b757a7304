"""Outcomes files (JSON Lines): what every arm answered on each labeled query, and its cost.

Format: docs/evaluation.md, "Outcomes files". Readers validate every line and raise
:class:`OutcomesError` naming the line number and the reason; nothing is skipped silently.

    >>> import io
    >>> line = ('{"query_id": "q1", "text": "2+2?", "label": "4", "arms": '
    ...         '{"big": {"prediction": "4", "cost_usd": 0.01}, '
    ...         '"small": {"prediction": null, "cost_usd": 0.0}}}')
    >>> [record] = read_outcomes(io.StringIO(line + "\\n"))
    >>> record.correct("big"), record.correct("small")
    (True, False)
    >>> read_outcomes(io.StringIO(line + "\\n" + "{oops\\n"))
    Traceback (most recent call last):
    ...
    service.outcomes.OutcomesError: line 2: invalid JSON: ...
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: The task of an outcomes line that names none (the benchmark and its replay use it).
DEFAULT_TASK = "default"


class OutcomesError(ValueError):
    """A malformed outcomes line; ``line`` is 1-based."""

    def __init__(self, line: int, reason: str, source: str | None = None) -> None:
        super().__init__(f"{source}: line {line}: {reason}" if source else f"line {line}: {reason}")
        self.line = line
        self.reason = reason


class ArmOutcome(BaseModel):
    """One arm's answer to one query. ``prediction`` is None when the call failed."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    prediction: str | None
    cost_usd: float = Field(ge=0.0)
    latency_ms: float | None = Field(default=None, ge=0.0)
    input_tokens: int | None = Field(default=None, ge=0)
    output_tokens: int | None = Field(default=None, ge=0)
    raw_output: str | None = None

    @field_validator("cost_usd")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("cost_usd must be finite")
        return v


class OutcomeRecord(BaseModel):
    """One labeled query with every arm's outcome."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    query_id: str = Field(min_length=1)
    task: str | None = None
    text: str
    options: list[str] | None = None
    label: str
    arms: dict[str, ArmOutcome] = Field(min_length=2)
    metadata: dict[str, Any] | None = None

    def correct(self, arm: str) -> bool:
        """Whether ``arm`` answered correctly (exact match with the label; failures are wrong)."""
        prediction = self.arms[arm].prediction
        return prediction is not None and prediction == self.label

    def cost(self, arm: str) -> float:
        return self.arms[arm].cost_usd


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def parse_line(line: str, line_no: int) -> OutcomeRecord:
    """Validate one JSON line (raises :class:`OutcomesError` with ``line_no``)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise OutcomesError(line_no, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise OutcomesError(line_no, f"expected a JSON object, got {type(obj).__name__}")
    try:
        return OutcomeRecord.model_validate(obj)
    except ValidationError as exc:
        raise OutcomesError(line_no, _reason(exc)) from None


def iter_outcomes(source: str | Path | IO[str]) -> Iterator[OutcomeRecord]:
    """Records of an outcomes file (path or text stream), in stream order, validated.

    Rejects blank lines, malformed objects and duplicate ``query_id`` values.
    """
    if isinstance(source, str | Path):
        with open(source, encoding="utf-8") as fh:
            try:
                yield from iter_outcomes(fh)
            except OutcomesError as exc:  # named with its file: a command may read several
                raise OutcomesError(exc.line, exc.reason, str(source)) from None
        return
    seen: dict[str, int] = {}
    for line_no, line in enumerate(source, start=1):
        if not line.strip():
            raise OutcomesError(line_no, "blank line")
        record = parse_line(line, line_no)
        if record.query_id in seen:
            raise OutcomesError(
                line_no,
                f"duplicate query_id {record.query_id!r} (first on line {seen[record.query_id]})",
            )
        seen[record.query_id] = line_no
        yield record


def read_outcomes(source: str | Path | IO[str]) -> list[OutcomeRecord]:
    """All records of an outcomes file (see :func:`iter_outcomes`)."""
    return list(iter_outcomes(source))


def write_outcomes(target: str | Path | IO[str], records: Iterable[OutcomeRecord]) -> int:
    """Write records as JSON Lines (unset optional fields omitted); returns the count."""
    if isinstance(target, str | Path):
        with open(target, "w", encoding="utf-8") as fh:
            return write_outcomes(fh, records)
    n = 0
    for record in records:
        target.write(record.model_dump_json(exclude_none=False, exclude_unset=True) + "\n")
        n += 1
    return n


def dumps_outcomes(records: Iterable[OutcomeRecord]) -> str:
    """Records as a JSON Lines string."""
    buf = io.StringIO()
    write_outcomes(buf, records)
    return buf.getvalue()
