"""Read models for people and the metrics: the decisions listing, one decision in full, the
per-arm and hourly statistics (views of the migrations), the service's counters, and a stream's
progress and outcomes (the demo).

The listings (``metallm decisions``, ``metallm stats``) are :data:`DisplayRow` mappings: every
column of the table or view, as stored, because they go to a printer that shows the columns
that fit and writes every column as CSV or JSON; a new column shows up there without a change
here. Everything the code itself reads is a typed row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.log.rows import ArmOutcomes
from service.storage import decisions, service_counters


def counters(conn: Connection) -> dict[str, int]:
    return {r.name: int(r.value) for r in conn.execute(sa.select(service_counters))}


#: A row for people: column → value, every column of a table or view.
DisplayRow = Mapping[str, Any]


@dataclass(frozen=True)
class DecisionDetails:
    """One decision with what a person needs to see why it was made and how it went."""

    query_id: str
    task: str
    text: str
    options: list[str]
    metadata: dict[str, Any] | None
    policy: str
    arm: str
    propensity: float
    probabilities: dict[str, float]
    arm_scores: dict[str, float] | None
    decided_at: datetime
    status: str
    prediction: str | None
    raw_output: str | None
    error: str | None
    cost_usd: float
    latency_ms: float | None
    fallback_arm: str | None
    label: str | None
    correct: bool | None
    reward: float | None
    score: float | None


def decision_details(conn: Connection, query_id: str) -> DecisionDetails | None:
    """One decision with everything a person needs to see why it was made."""
    names = DecisionDetails.__dataclass_fields__
    cols = [decisions.c[name] for name in names]
    row = conn.execute(sa.select(*cols).where(decisions.c.query_id == query_id)).first()
    return None if row is None else DecisionDetails(**row._mapping)


def stats_summary(conn: Connection) -> list[DisplayRow]:
    rows = conn.execute(sa.text("SELECT * FROM arm_summary ORDER BY arm"))
    return [dict(r._mapping) for r in rows]


def hourly_stats(conn: Connection, hours: int) -> list[DisplayRow]:
    rows = conn.execute(
        sa.text(
            "SELECT * FROM hourly_stats WHERE hour >= date_trunc('hour', now()) "
            "- make_interval(hours => :hours - 1) ORDER BY hour, arm"
        ),
        {"hours": hours},
    )
    return [dict(r._mapping) for r in rows]


def query_decisions(
    conn: Connection,
    since: datetime | None = None,
    arm: str | None = None,
    task: str | None = None,
    limit: int | None = None,
) -> list[DisplayRow]:
    """Decision rows for people (without the context vector), newest last."""
    cols = [c for c in decisions.c if c.name not in ("context", "text")]
    stmt = sa.select(*cols).order_by(decisions.c.decided_at, decisions.c.query_id)
    if since is not None:
        stmt = stmt.where(decisions.c.decided_at >= since)
    if arm is not None:
        stmt = stmt.where(decisions.c.arm == arm)
    if task is not None:
        stmt = stmt.where(decisions.c.task == task)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [dict(r._mapping) for r in conn.execute(stmt)]


def labeled_by_arm(conn: Connection) -> list[ArmOutcomes]:
    """Per arm, for the metrics: decisions with a label, of which correct, the mean reward."""
    rows = conn.execute(
        sa.select(
            decisions.c.arm,
            sa.func.count(decisions.c.label),
            sa.func.count().filter(decisions.c.correct.is_(True)),
            sa.func.avg(decisions.c.reward),
        ).group_by(decisions.c.arm)
    )
    return [
        ArmOutcomes(r[0], int(r[1]), int(r[2]), None if r[3] is None else float(r[3])) for r in rows
    ]


@dataclass(frozen=True)
class Progress:
    """How far a stream has got: decisions, labels, correct ones, spend, decisions per arm."""

    decided: int
    labeled: int
    correct: int
    cost_usd: float
    arms: tuple[tuple[str, int], ...]


def progress(conn: Connection) -> Progress:
    decided, labeled, correct, cost = conn.execute(
        sa.select(
            sa.func.count(),
            sa.func.count(decisions.c.label),
            sa.func.count().filter(decisions.c.correct.is_(True)),
            sa.func.coalesce(sa.func.sum(decisions.c.cost_usd), 0.0),
        )
    ).one()
    arms = conn.execute(
        sa.select(decisions.c.arm, sa.func.count())
        .group_by(decisions.c.arm)
        .order_by(decisions.c.arm)
    ).all()
    return Progress(
        int(decided), int(labeled), int(correct), float(cost), tuple((a, int(n)) for a, n in arms)
    )


@dataclass(frozen=True)
class Outcome:
    """One decision's arm and, once labelled, whether it was right; its cost."""

    query_id: str
    arm: str
    correct: bool | None
    cost_usd: float


def outcomes(conn: Connection, labeled_only: bool = False) -> list[Outcome]:
    """Decisions in the order they were made (with a label only, if asked)."""
    stmt = sa.select(
        decisions.c.query_id, decisions.c.arm, decisions.c.correct, decisions.c.cost_usd
    ).order_by(decisions.c.decided_at, decisions.c.query_id)
    if labeled_only:
        stmt = stmt.where(decisions.c.label.is_not(None))
    return [Outcome(r.query_id, r.arm, r.correct, float(r.cost_usd)) for r in conn.execute(stmt)]
