"""Read models for people and the metrics: the decisions listing, one decision in full, the
per-arm and hourly statistics (views of the migrations), and the service's counters. Rows for
display are mappings of the columns shown (``metallm decisions``, ``metallm stats``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.log.rows import ArmOutcomes
from service.storage import decisions, service_counters


def counters(conn: Connection) -> dict[str, int]:
    return {r.name: int(r.value) for r in conn.execute(sa.select(service_counters))}


def decision_details(conn: Connection, query_id: str) -> dict[str, Any] | None:
    """One decision with everything a person needs to see why it was made."""
    cols = [c for c in decisions.c if c.name != "context"]
    row = conn.execute(sa.select(*cols).where(decisions.c.query_id == query_id)).first()
    return None if row is None else dict(row._mapping)


def stats_summary(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(sa.text("SELECT * FROM arm_summary ORDER BY arm"))
    return [dict(r._mapping) for r in rows]


def hourly_stats(conn: Connection, hours: int) -> list[dict[str, Any]]:
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
) -> list[dict[str, Any]]:
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
