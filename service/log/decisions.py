"""The decisions' SQL: which queries are decided, and a decided batch's writes (the decisions,
the rewards of failed arms, and the labels that waited for them), which need
:func:`service.log.transaction.lock_learning_log`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.decision import EVENT_COLUMNS, Decision, LoggedDecision, event_of
from service.events import DecisionEvent
from service.log.join import Conflict, check_early_labels
from service.log.labels import (
    bump_counter,
    record_rejected_labels,
    store_labels,
    take_pending_labels,
)
from service.log.rows import AppliedReward, FoundDecision, RejectedLabel, StoredQuery
from service.reward import RewardSettings, failure_reward, score_label
from service.storage import decisions, one_of, reward_sequence


def existing_query_ids(conn: Connection, query_ids: Iterable[str]) -> set[str]:
    ids = list(set(query_ids))
    if not ids:
        return set()
    rows = conn.execute(
        sa.select(decisions.c.query_id).where(one_of(decisions.c.query_id, ids))
    ).scalars()
    return set(rows)


def decision_events(conn: Connection, query_ids: Iterable[str]) -> list[DecisionEvent]:
    """The decision events of those of these queries already decided, in the order of
    ``query_ids``."""
    ids = list(dict.fromkeys(query_ids))
    if not ids:
        return []
    cols = [decisions.c[name] for name in EVENT_COLUMNS]
    found = {
        r.query_id: event_of(r._mapping)
        for r in conn.execute(sa.select(*cols).where(one_of(decisions.c.query_id, ids)))
    }
    return [found[q] for q in ids if q in found]


def stored_queries(conn: Connection, query_ids: Iterable[str]) -> dict[str, StoredQuery]:
    """The queries behind those of these ids already decided, by id."""
    ids = list(set(query_ids))
    if not ids:
        return {}
    c = decisions.c
    rows = conn.execute(
        sa.select(c.query_id, c.task, c.text, c.options, c["metadata"]).where(
            one_of(c.query_id, ids)
        )
    )
    return {r.query_id: StoredQuery(r.task, r.text, tuple(r.options), r.metadata) for r in rows}


@dataclass(frozen=True)
class StoredDecisions:
    """What :func:`store_decisions` stored."""

    inserted: dict[str, int]  # decision_seq by query id (a query decided before is not)
    logged: list[LoggedDecision]  # their entries in the decision log
    rewards: list[AppliedReward]  # failure rewards, and the rewards of early labels
    early_labels: int  # labels that had waited for these decisions
    rejected_labels: list[RejectedLabel]  # of those, the ones outside their label set
    conflicts: list[Conflict] = field(default_factory=list)  # between the others of a query


def store_decisions(
    conn: Connection, batch: Sequence[Decision], failed: Iterable[str], settings: RewardSettings
) -> StoredDecisions:
    """A decided batch's writes, in one call: insert the decisions not stored yet; reward now
    (wrong, at no cost) those whose chosen arm ``failed``: their label, when it comes, does not
    count again; take the labels (and scores) that waited for them, score them with
    ``settings`` and store them with their rewards (a label outside its decision's label set,
    or for an open task without a check, is recorded as rejected instead; the first other
    one of a query is scored, the later ones are its duplicates)."""
    inserted = insert_decisions(conn, batch)
    by_id = {d.query_id: d for d in batch}
    logged = [by_id[q].logged(seq) for q, seq in inserted.items()]
    failing = [q for q in dict.fromkeys(failed) if q in inserted]
    on_failure = failure_reward(settings)
    seqs = store_failure_rewards(conn, failing, on_failure, settings.lam)
    found = {q: FoundDecision.of(by_id[q], seqs.get(q)) for q in inserted}
    rewards = [found[q].reward(seq, on_failure) for q, seq in seqs.items()]
    early = check_early_labels(take_pending_labels(conn, inserted), found, settings)
    record_rejected_labels(conn, early.rejected)
    if early.duplicates:
        bump_counter(conn, "duplicate_labels", early.duplicates)
    scored = [
        score_label(found[p.query_id], p.label, p.labeled_at, settings, p.duplicates, p.score)
        for p in early.kept
    ]
    rewards += store_labels(conn, scored)
    return StoredDecisions(
        inserted, logged, rewards, len(early.kept), early.rejected, early.conflicts
    )


def store_failure_rewards(
    conn: Connection, query_ids: Sequence[str], reward: float, lam: float
) -> dict[str, int]:
    """Store the reward of decisions whose arm failed, at decision time, each with the next
    reward sequence number; returns them by id. Their labels, when they come, are stored by
    :func:`store_labels` without a reward."""
    if not query_ids:
        return {}
    result = conn.execute(
        sa.update(decisions)
        .where(
            one_of(decisions.c.query_id, query_ids),
            # not `reward_seq IS NULL`, which the planner may serve from the reward_seq index
            # (every unrewarded decision) instead of the primary key: see store_labels
            sa.func.num_nulls(decisions.c.reward_seq) == 1,
        )
        .values(
            reward=reward,
            reward_lambda=lam,
            reward_applied_at=sa.func.now(),
            reward_seq=reward_sequence.next_value(),
        )
        .returning(decisions.c.query_id, decisions.c.reward_seq)
    )
    return {q: int(seq) for q, seq in result}


def insert_decisions(conn: Connection, rows: Sequence[Decision | dict[str, Any]]) -> dict[str, int]:
    """Insert decisions (typed, or rows written by hand); a query already decided is left
    alone. Returns the ``decision_seq`` of each query inserted, by id.

    Every row has the columns of the first (the others take their defaults). Sent as one short
    INSERT per row through psycopg's ``executemany`` (pipelined, one round trip a batch, and
    prepared). SQLAlchemy's multi-row INSERT bound ~30 parameters a row, and psycopg parses a
    statement of over 50 parameters afresh on every call: the batch cost ~3× the client CPU
    (``benchmarks/storage_writes.py``)."""
    if not rows:
        return {}
    rows = [r.row() if isinstance(r, Decision) else r for r in rows]
    columns = tuple(rows[0])
    sql, to_driver = _insert_decisions_plan(columns, conn.dialect)
    pairs = list(zip(columns, to_driver, strict=True))
    params = [[convert(row[name]) for name, convert in pairs] for row in rows]
    if not conn.in_transaction():  # the driver's cursor does not start SQLAlchemy's
        conn.begin()  # transaction, which conn.commit() commits: as a statement would
    inserted: dict[str, int] = {}
    with _as_sqlalchemy_errors(conn, sql), conn.connection.dbapi_connection.cursor() as cursor:
        cursor.executemany(sql, params, returning=True)  # in this connection's transaction
        while True:  # one result per row: empty where the query was decided already
            inserted.update(cursor.fetchall())
            if not cursor.nextset():
                return inserted


@contextmanager
def _as_sqlalchemy_errors(conn: Connection, statement: str) -> Iterator[None]:
    """Driver errors raised as SQLAlchemy raises them for its own statements (wrapped, the
    connection invalidated when it was lost), so callers tell an unreachable Postgres from a
    bad row the same way for every statement."""
    dbapi = conn.dialect.loaded_dbapi
    try:
        yield
    except dbapi.Error as exc:
        lost = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, None)
        if lost:
            conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(
            statement,
            None,
            exc,
            dbapi.Error,
            hide_parameters=True,
            connection_invalidated=lost,
            dialect=conn.dialect,
        ) from exc


@functools.cache
def _insert_decisions_plan(
    columns: tuple[str, ...], dialect: sa.engine.Dialect
) -> tuple[str, tuple[Callable[[Any], Any], ...]]:
    """The INSERT for rows of these columns, and per column how a value goes to the driver:
    SQLAlchemy's own bind processor for the column's type (JSONB wrapped as JSON, ``None`` as
    JSON null unless the column stores SQL NULL…), so values are sent as its INSERT sends
    them. Made once per set of columns."""
    unknown = [name for name in columns if name not in decisions.c]
    if unknown:
        raise KeyError(f"decisions has no column {', '.join(unknown)}")
    quote = dialect.identifier_preparer.quote
    sql = (
        f"INSERT INTO decisions ({', '.join(quote(name) for name in columns)}) "
        f"VALUES ({', '.join(['%s'] * len(columns))}) "
        "ON CONFLICT (query_id) DO NOTHING RETURNING query_id, decision_seq"
    )
    processors = (
        decisions.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns
    )
    return sql, tuple(process or _as_is for process in processors)


def _as_is(value: Any) -> Any:
    return value
