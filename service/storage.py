"""Postgres access (SQLAlchemy 2 Core over psycopg 3). The schema is made by the Alembic
migrations; :data:`metadata` declares the same tables, exactly (``tests/test_schema.py``).

Every statement uses bound parameters. A ``schema`` puts all of metallm's tables in one
Postgres schema (through ``search_path``), which is how tests keep to themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from service.context import LEGACY

metadata = sa.MetaData()
"""The tables as the migrations make them (``tests/test_schema.py`` compares the two)."""

#: Numbers the rewards in the order they are committed (a policy applies them in that order).
reward_sequence = sa.Sequence("reward_seq", data_type=sa.BigInteger, metadata=metadata)

decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("query_id", sa.Text, primary_key=True),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("options", postgresql.JSONB, nullable=False),
    sa.Column("metadata", postgresql.JSONB),
    sa.Column("sent_at", sa.DateTime(timezone=True)),
    sa.Column(
        "decided_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("arm", sa.Text, nullable=False),
    sa.Column("propensity", sa.Float, nullable=False),
    sa.Column("probabilities", postgresql.JSONB, nullable=False),
    sa.Column("policy", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("prediction", sa.Text),
    sa.Column("raw_output", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("input_tokens", sa.Integer),
    sa.Column("output_tokens", sa.Integer),
    sa.Column("cost_usd", sa.Float, nullable=False, server_default="0"),
    sa.Column("latency_ms", sa.Float),
    sa.Column("embedding_model", sa.Text, nullable=False),
    sa.Column("context", sa.LargeBinary, nullable=False),
    sa.Column("kafka_partition", sa.Integer),
    sa.Column("kafka_offset", sa.BigInteger),
    sa.Column("label", sa.Text),
    sa.Column("correct", sa.Boolean),
    sa.Column("reward", sa.Float),
    sa.Column("reward_lambda", sa.Float),
    sa.Column("labeled_at", sa.DateTime(timezone=True)),
    sa.Column("reward_applied_at", sa.DateTime(timezone=True)),
    sa.Column("reward_seq", sa.BigInteger),
    sa.Column("duplicate_labels", sa.Integer, nullable=False, server_default="0"),
    # requests sent for the decision: retries and the fallback's included
    sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
    # the arm asked after the chosen arm failed (its answer, if any, is the prediction)
    sa.Column("fallback_arm", sa.Text),
    # answer_mode "score": the (calibrated) log-score of each allowed answer
    sa.Column("answer_scores", postgresql.JSONB(none_as_null=True)),
    # every candidate arm's policy score at decision time
    sa.Column("arm_scores", postgresql.JSONB(none_as_null=True)),
    # the order decisions' costs were observed in (budget pacing replays them after a restart)
    sa.Column("decision_seq", sa.BigInteger, sa.Identity(always=False), nullable=False),
    # the ContextLayout.spec of ``context`` (NULL: the raw embedding, "legacy")
    sa.Column("context_layout", sa.Text),
    sa.UniqueConstraint("reward_seq", name="decisions_reward_seq_key"),
    sa.UniqueConstraint("decision_seq", name="decisions_decision_seq_key"),
    sa.CheckConstraint("propensity > 0 AND propensity <= 1", name="propensity_in_0_1"),
    sa.CheckConstraint("status IN ('ok', 'parse_error', 'llm_error')", name="known_status"),
    sa.CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    sa.Index("decisions_decided_at", "decided_at"),
    sa.Index("decisions_arm_task", "arm", "task"),
)

pending_labels = sa.Table(
    "pending_labels",
    metadata,
    sa.Column("query_id", sa.Text, primary_key=True),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("labeled_at", sa.DateTime(timezone=True)),
    sa.Column(
        "received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("duplicates", sa.Integer, nullable=False, server_default="0"),
    sa.Index("pending_labels_received_at", "received_at"),
)

policy_checkpoints = sa.Table(
    "policy_checkpoints",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("policy", sa.Text, nullable=False),
    sa.Column("n_updates", sa.BigInteger, nullable=False),
    sa.Column("reward_watermark", sa.BigInteger, nullable=False),
    sa.Column("state", sa.LargeBinary, nullable=False),
    sa.Column("decision_watermark", sa.BigInteger, nullable=False, server_default="0"),
)

label_offsets = sa.Table(
    "label_offsets",
    metadata,
    sa.Column("consumer_group", sa.Text, primary_key=True),
    sa.Column("topic", sa.Text, primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

service_counters = sa.Table(
    "service_counters",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False, server_default="0"),
)


def make_engine(url: str, schema: str | None = None, **kwargs: Any) -> Engine:
    """An engine for ``url`` (a bare ``postgresql://`` URL is given the psycopg 3 driver)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    connect_args: dict[str, Any] = dict(kwargs.pop("connect_args", {}))
    if schema:
        if not schema.replace("_", "").isalnum():
            raise ValueError(f"schema name must be alphanumeric/underscore: {schema!r}")
        connect_args["options"] = f"-csearch_path={schema}"
    return sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True, **kwargs)


def vector_to_bytes(vector: np.ndarray) -> bytes:
    """Contexts are stored as little-endian float32."""
    return np.asarray(vector, dtype="<f4").tobytes()


def bytes_to_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")


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

    def __post_init__(self) -> None:
        if self.layout is None:
            object.__setattr__(self, "layout", LEGACY)


@dataclass(frozen=True)
class LoggedDecision:
    """What the context builder and the budget pacer learn from each stored decision, in
    ``decision_seq`` order."""

    seq: int
    cost_usd: float
    task: str
    n_chars: int
    metadata: dict[str, Any] | None


def _one_of(column: sa.ColumnElement[str], values: Iterable[str]) -> sa.ColumnElement[bool]:
    """``column = ANY(%s)``, the values bound as one text array: the same statement for any
    number of values. ``IN`` binds a parameter each, and psycopg parses a statement of over 50
    parameters afresh on every call."""
    return column == sa.any_(sa.literal(list(values), postgresql.ARRAY(sa.Text)))


def existing_query_ids(conn: Connection, query_ids: Iterable[str]) -> set[str]:
    ids = list(set(query_ids))
    if not ids:
        return set()
    rows = conn.execute(
        sa.select(decisions.c.query_id).where(_one_of(decisions.c.query_id, ids))
    ).scalars()
    return set(rows)


def insert_decisions(conn: Connection, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Insert decision rows; a query already decided is left alone. Returns the ``decision_seq``
    of each query inserted, by id.

    Every row has the columns of the first (the others take their defaults). Sent as one short
    INSERT per row through psycopg's ``executemany`` (pipelined, one round trip a batch, and
    prepared). SQLAlchemy's multi-row INSERT bound ~30 parameters a row, and psycopg parses a
    statement of over 50 parameters afresh on every call: the batch cost ~3× the client CPU
    (``benchmarks/storage_writes.py``)."""
    if not rows:
        return {}
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


def take_pending_labels(conn: Connection, query_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Delete and return the pending labels waiting for these queries."""
    ids = list(query_ids)
    if not ids:
        return []
    stmt = (
        sa.delete(pending_labels)
        .where(_one_of(pending_labels.c.query_id, ids))
        .returning(
            pending_labels.c.query_id,
            pending_labels.c.label,
            pending_labels.c.labeled_at,
            pending_labels.c.duplicates,
        )
    )
    return [dict(r._mapping) for r in conn.execute(stmt)]


def decision_for_label(conn: Connection, query_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        sa.select(
            decisions.c.query_id,
            decisions.c.arm,
            decisions.c.prediction,
            decisions.c.status,
            decisions.c.cost_usd,
            decisions.c.context,
            decisions.c.context_layout,
            decisions.c.label,
            decisions.c.options,
            decisions.c.reward_seq,
            decisions.c.decided_at,
        )
        .where(decisions.c.query_id == query_id)
        .with_for_update()
    ).first()
    return None if row is None else dict(row._mapping)


def record_reward(
    conn: Connection,
    query_id: str,
    label: str,
    labeled_at: datetime | None,
    correct: bool,
    reward: float,
    lam: float,
    extra_duplicates: int = 0,
) -> int:
    """Store the label and reward on the decision and give it the next reward sequence number.
    Only for a decision not rewarded yet (each decision updates the policy at most once)."""
    stmt = (
        sa.update(decisions)
        .where(
            decisions.c.query_id == query_id,
            decisions.c.label.is_(None),
            decisions.c.reward_seq.is_(None),
        )
        .values(
            label=label,
            labeled_at=labeled_at,
            correct=correct,
            reward=reward,
            reward_lambda=lam,
            reward_applied_at=sa.func.now(),
            reward_seq=reward_sequence.next_value(),
            duplicate_labels=decisions.c.duplicate_labels + extra_duplicates,
        )
        .returning(decisions.c.reward_seq)
    )
    return int(conn.execute(stmt).scalar_one())


def record_failure_reward(conn: Connection, query_id: str, reward: float, lam: float) -> int:
    """Store the reward of a decision whose arm failed, at decision time, and give it the next
    reward sequence number. Its label, when it comes, is stored by :func:`record_label`."""
    stmt = (
        sa.update(decisions)
        .where(decisions.c.query_id == query_id, decisions.c.reward_seq.is_(None))
        .values(
            reward=reward,
            reward_lambda=lam,
            reward_applied_at=sa.func.now(),
            reward_seq=reward_sequence.next_value(),
        )
        .returning(decisions.c.reward_seq)
    )
    return int(conn.execute(stmt).scalar_one())


def record_label(
    conn: Connection,
    query_id: str,
    label: str,
    labeled_at: datetime | None,
    correct: bool,
    extra_duplicates: int = 0,
) -> None:
    """Store a label on a decision that was already rewarded (its arm failed): no new reward."""
    conn.execute(
        sa.update(decisions)
        .where(decisions.c.query_id == query_id, decisions.c.label.is_(None))
        .values(
            label=label,
            labeled_at=labeled_at,
            correct=correct,
            duplicate_labels=decisions.c.duplicate_labels + extra_duplicates,
        )
    )


def count_duplicate_label(conn: Connection, query_id: str) -> None:
    conn.execute(
        sa.update(decisions)
        .where(decisions.c.query_id == query_id)
        .values(duplicate_labels=decisions.c.duplicate_labels + 1)
    )


def add_pending_label(
    conn: Connection, query_id: str, label: str, labeled_at: datetime | None
) -> bool:
    """Keep a label whose decision does not exist yet. Returns False when one was already kept
    (the first label wins; the repeat is counted)."""
    stmt = postgresql.insert(pending_labels).values(
        query_id=query_id, label=label, labeled_at=labeled_at
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["query_id"],
        set_={"duplicates": pending_labels.c.duplicates + 1},
    ).returning(pending_labels.c.duplicates)
    return conn.execute(stmt).scalar_one() == 0


def has_pending_label(conn: Connection, query_id: str) -> bool:
    stmt = sa.select(pending_labels.c.query_id).where(pending_labels.c.query_id == query_id)
    return conn.execute(stmt).first() is not None


def applied_label_offsets(
    conn: Connection, group: str, partitions: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """The next offset not yet applied, per (topic, partition) of this consumer group; the rows
    stay locked until the transaction ends (one batch of a partition is applied at a time)."""
    wanted = set(partitions)
    if not wanted:
        return {}
    rows = conn.execute(
        sa.select(label_offsets.c.topic, label_offsets.c.partition, label_offsets.c.next_offset)
        .where(
            label_offsets.c.consumer_group == group,
            label_offsets.c.topic.in_(sorted({t for t, _ in wanted})),
        )
        .with_for_update()
    )
    return {
        (r.topic, r.partition): int(r.next_offset) for r in rows if (r.topic, r.partition) in wanted
    }


def record_label_offsets(conn: Connection, group: str, after: dict[tuple[str, int], int]) -> None:
    """Record that every label before ``after[(topic, partition)]`` has been applied."""
    for (topic, partition), next_offset in after.items():
        stmt = postgresql.insert(label_offsets).values(
            consumer_group=group, topic=topic, partition=partition, next_offset=next_offset
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["consumer_group", "topic", "partition"],
            set_={
                "next_offset": sa.func.greatest(label_offsets.c.next_offset, next_offset),
                "updated_at": sa.func.now(),
            },
        )
        conn.execute(stmt)


def count_pending_labels(conn: Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(pending_labels)).scalar_one())


def expire_pending_labels(conn: Connection, ttl_seconds: float) -> list[dict[str, Any]]:
    """Drop labels that waited longer than the TTL for a decision; returns what was dropped."""
    stmt = (
        sa.delete(pending_labels)
        .where(
            pending_labels.c.received_at
            < sa.func.now()
            - sa.func.make_interval(
                0, 0, 0, 0, 0, 0, sa.bindparam("ttl", ttl_seconds, type_=sa.Float)
            )
        )
        .returning(pending_labels.c.query_id, pending_labels.c.label, pending_labels.c.received_at)
    )
    return [dict(r._mapping) for r in conn.execute(stmt)]


def bump_counter(conn: Connection, name: str, by: int = 1) -> None:
    stmt = postgresql.insert(service_counters).values(name=name, value=by)
    stmt = stmt.on_conflict_do_update(
        index_elements=["name"], set_={"value": service_counters.c.value + by}
    )
    conn.execute(stmt)


def counters(conn: Connection) -> dict[str, int]:
    return {r.name: int(r.value) for r in conn.execute(sa.select(service_counters))}


def save_checkpoint(
    conn: Connection,
    policy: str,
    n_updates: int,
    watermark: int,
    state: bytes,
    decision_watermark: int = 0,
    keep: int = 3,
) -> None:
    """Store a policy checkpoint and prune all but the newest ``keep``."""
    conn.execute(
        sa.insert(policy_checkpoints).values(
            policy=policy,
            n_updates=n_updates,
            reward_watermark=watermark,
            decision_watermark=decision_watermark,
            state=state,
        )
    )
    newest = (
        sa.select(policy_checkpoints.c.id)
        .order_by(policy_checkpoints.c.id.desc())
        .limit(keep)
        .scalar_subquery()
    )
    conn.execute(sa.delete(policy_checkpoints).where(policy_checkpoints.c.id.not_in(newest)))


def latest_checkpoint(conn: Connection) -> dict[str, Any] | None:
    row = conn.execute(
        sa.select(policy_checkpoints).order_by(policy_checkpoints.c.id.desc()).limit(1)
    ).first()
    return None if row is None else dict(row._mapping)


def decision_log(conn: Connection, after: int) -> list[LoggedDecision]:
    """Every decision after a ``decision_seq`` watermark, in order (see :class:`LoggedDecision`)."""
    stmt = (
        sa.select(
            decisions.c.decision_seq,
            decisions.c.cost_usd,
            decisions.c.task,
            sa.func.char_length(decisions.c.text),
            decisions.c.metadata,
        )
        .where(decisions.c.decision_seq > after)
        .order_by(decisions.c.decision_seq)
    )
    return [
        LoggedDecision(int(seq), float(cost), task, int(n or 0), meta)
        for seq, cost, task, n, meta in conn.execute(stmt)
    ]


def rewards_after(conn: Connection, watermark: int) -> list[AppliedReward]:
    """Rewards committed after a checkpoint's watermark, in the order they were applied."""
    rows = conn.execute(
        sa.select(
            decisions.c.reward_seq,
            decisions.c.query_id,
            decisions.c.arm,
            decisions.c.context,
            decisions.c.reward,
            decisions.c.context_layout,
        )
        .where(decisions.c.reward_seq > watermark)
        .order_by(decisions.c.reward_seq)
    )
    return [
        AppliedReward(
            r.reward_seq,
            r.query_id,
            r.arm,
            bytes_to_vector(r.context),
            r.reward,
            r.context_layout,
        )
        for r in rows
    ]


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


def decisions_by_id(conn: Connection, query_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Stored decisions (what the decision event carries), in the order of ``query_ids``."""
    ids = list(dict.fromkeys(query_ids))
    if not ids:
        return []
    cols = [
        decisions.c.query_id,
        decisions.c.task,
        decisions.c.arm,
        decisions.c.propensity,
        decisions.c.probabilities,
        decisions.c.prediction,
        decisions.c.status,
        decisions.c.cost_usd,
        decisions.c.latency_ms,
        decisions.c.decided_at,
        decisions.c.attempts,
        decisions.c.fallback_arm,
    ]
    found = {
        r.query_id: dict(r._mapping)
        for r in conn.execute(sa.select(*cols).where(_one_of(decisions.c.query_id, ids)))
    }
    return [found[q] for q in ids if q in found]


def labeled_by_arm(conn: Connection) -> list[tuple[str, int, int, float | None]]:
    """Per arm, for the metrics: (arm, decisions with a label, of which correct, mean reward)."""
    rows = conn.execute(
        sa.select(
            decisions.c.arm,
            sa.func.count(decisions.c.label),
            sa.func.count().filter(decisions.c.correct.is_(True)),
            sa.func.avg(decisions.c.reward),
        ).group_by(decisions.c.arm)
    )
    return [(r[0], int(r[1]), int(r[2]), None if r[3] is None else float(r[3])) for r in rows]


def last_reward_seq(conn: Connection) -> int:
    """The highest reward sequence number committed (0: none yet)."""
    return int(conn.execute(sa.select(sa.func.max(decisions.c.reward_seq))).scalar() or 0)
