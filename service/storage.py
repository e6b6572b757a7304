"""Postgres access (SQLAlchemy 2 Core over psycopg 3). The schema is made by the Alembic
migrations; :data:`metadata` declares the same tables, exactly (``tests/test_schema.py``).

Every statement uses bound parameters. A ``schema`` puts all of metallm's tables in one
Postgres schema (through ``search_path``), which is how tests keep to themselves.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from psycopg import sql as psycopg_sql
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from service.context import LEGACY
from service.decision import EVENT_COLUMNS, Decision, LoggedDecision

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
    # the service instance that decided, and the seed of its random draws (NULL: before 0007)
    sa.Column("instance", sa.Text),
    sa.Column("rng_seed", sa.BigInteger),
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
    #: seconds from the reward's transaction to when it was read from the log (None: not read)
    age_s: float | None = None

    def __post_init__(self) -> None:
        if self.layout is None:
            object.__setattr__(self, "layout", LEGACY)


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


#: NOTIFY channel (with the schema's name after it) that a learning-log append wakes
LOG_CHANNEL_PREFIX = "metallm_log_"


def lock_learning_log(conn: Connection, sender: str = "") -> None:
    """Take the learning log's lock for the rest of this transaction, and wake the other
    instances when it commits.

    Invariant: every transaction that gives out ``reward_seq`` or ``decision_seq`` values (or
    joins labels to decisions) takes this lock first, and holds it until COMMIT or ROLLBACK.
    So sequence numbers are given out in commit order across every process on the database:
    once a reader sees seq ``n`` committed, every seq below ``n`` is committed (and visible)
    or rolled back for good, and a reader can move its watermark to ``n``. It also makes the
    label ↔ decision join safe: a label and its decision stored at once by two instances are
    never both stored without seeing each other. The lock is one per schema (a
    transaction-level advisory lock); hold it only for database work, never for an LLM call.

    The notification's payload is ``sender`` (the instance's id): an instance's own
    :class:`LogListener` ignores its own appends, which the instance applies itself.
    """
    conn.execute(
        sa.text(
            "SELECT pg_advisory_xact_lock(hashtextextended('metallm-log:' || current_schema(), 0)),"
            " pg_notify(:prefix || current_schema(), :sender)"
        ),
        {"prefix": LOG_CHANNEL_PREFIX, "sender": sender},
    )


def decisions_for_labels(conn: Connection, query_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The decisions these labels are for (what scoring needs), by id, locked until commit."""
    ids = sorted(set(query_ids))
    if not ids:
        return {}
    rows = conn.execute(
        sa.select(
            decisions.c.query_id,
            decisions.c.arm,
            decisions.c.prediction,
            decisions.c.status,
            decisions.c.cost_usd,
            decisions.c.context,
            decisions.c.context_layout,
            decisions.c.label,
            decisions.c.reward_seq,
            decisions.c.decided_at,
        )
        .where(_one_of(decisions.c.query_id, ids))
        .order_by(decisions.c.query_id)
        .with_for_update()
    )
    return {r.query_id: dict(r._mapping) for r in rows}


@dataclass(frozen=True)
class LabelRow:
    """A label stored on its decision: with a new reward (``reward`` set), or only the label
    (the decision was rewarded when its arm failed)."""

    query_id: str
    label: str
    labeled_at: datetime | None
    correct: bool
    reward: float | None = None
    lam: float | None = None
    extra_duplicates: int = 0


def _arrays(**columns: tuple[sa.types.TypeEngine, list[Any]]) -> tuple[str, dict[str, Any]]:
    """``unnest(...) AS v(name, ...)`` over bound arrays, one per column, and its parameters:
    one statement for any number of rows."""
    dialect = postgresql.dialect()
    casts = ", ".join(f"CAST(:{n} AS {t.compile(dialect)}[])" for n, (t, _) in columns.items())
    params = {name: values for name, (_, values) in columns.items()}
    return f"unnest({casts}) AS v({', '.join(columns)})", params


def _label_columns(rows: Sequence[LabelRow]) -> dict[str, tuple[sa.types.TypeEngine, list[Any]]]:
    return {
        "query_id": (sa.Text(), [r.query_id for r in rows]),
        "label": (sa.Text(), [r.label for r in rows]),
        "labeled_at": (sa.DateTime(timezone=True), [r.labeled_at for r in rows]),
        "correct": (sa.Boolean(), [r.correct for r in rows]),
        "dupes": (sa.Integer(), [r.extra_duplicates for r in rows]),
    }


def store_labels(
    conn: Connection, scored: Sequence[tuple[Mapping[str, Any], LabelRow]]
) -> list[AppliedReward]:
    """Store labels on their decisions (each given with its decision: its id, arm, context
    and layout), one statement for all: a label with a reward gets the next reward sequence
    number (a decision is rewarded at most once); one without gets only its label. Returns the
    rewards stored. Needs :func:`lock_learning_log`."""
    seqs = _store_labels(conn, [row for _, row in scored])
    return [
        _reward_of(seqs[row.query_id], decision, row.reward)
        for decision, row in scored
        if row.query_id in seqs and row.reward is not None
    ]


def _reward_of(seq: int, decision: Mapping[str, Any], reward: float) -> AppliedReward:
    return AppliedReward(
        seq,
        decision["query_id"],
        decision["arm"],
        bytes_to_vector(decision["context"]),
        reward,
        decision.get("context_layout"),
    )


def _store_labels(conn: Connection, rows: Sequence[LabelRow]) -> dict[str, int]:
    out: dict[str, int] = {}
    rewarded = [r for r in rows if r.reward is not None]
    if rewarded:
        values, params = _arrays(
            **_label_columns(rewarded),
            reward=(sa.Float(), [r.reward for r in rewarded]),
            lam=(sa.Float(), [r.lam for r in rewarded]),
        )
        result = conn.execute(
            sa.text(
                "UPDATE decisions AS d SET label = v.label, labeled_at = v.labeled_at, "
                "correct = v.correct, reward = v.reward, reward_lambda = v.lam, "
                "reward_applied_at = now(), reward_seq = nextval('reward_seq'), "
                "duplicate_labels = d.duplicate_labels + v.dupes "
                f"FROM {values} WHERE d.query_id = v.query_id "
                # label and reward_seq both NULL, written so that no index can serve it: as
                # `reward_seq IS NULL` the planner may take every unrewarded decision from
                # the reward_seq index (guessed at 0.5 % of the table) and compare each with
                # every label (nested loop, join filter): 0.15 s a batch of 64 on 5,000
                # decisions, 0.5-1 s a batch of 1,000 on 20,000. Each label's decision is
                # found by primary key instead.
                "AND num_nulls(d.label, d.reward_seq) = 2 "
                "RETURNING d.query_id, d.reward_seq"
            ),
            params,
        )
        out.update((q, int(seq)) for q, seq in result)
    label_only = [r for r in rows if r.reward is None]
    if label_only:
        values, params = _arrays(**_label_columns(label_only))
        conn.execute(
            sa.text(
                "UPDATE decisions AS d SET label = v.label, labeled_at = v.labeled_at, "
                "correct = v.correct, duplicate_labels = d.duplicate_labels + v.dupes "
                f"FROM {values} WHERE d.query_id = v.query_id AND d.label IS NULL"
            ),
            params,
        )
    return out


@dataclass
class StoredDecisions:
    """What :func:`store_decisions` stored."""

    inserted: dict[str, int]  # decision_seq by query id (a query decided before is not)
    logged: list[LoggedDecision]  # their entries in the decision log
    rewards: list[AppliedReward]  # failure rewards, and the rewards of early labels
    early_labels: int  # labels that had waited for these decisions


def store_decisions(
    conn: Connection,
    batch: Sequence[Decision],
    failed: Iterable[str],
    failure_reward: float,
    lam: float,
    score: Callable[[Mapping[str, Any], Mapping[str, Any]], LabelRow],
) -> StoredDecisions:
    """A decided batch's writes, in one call: insert the decisions not stored yet; reward now,
    with ``failure_reward``, those whose chosen arm ``failed``; take the labels that waited for
    them, scored by ``score(decision row, waiting label)``, and store them with their rewards.
    Needs :func:`lock_learning_log`."""
    inserted = insert_decisions(conn, batch)
    by_id = {d.query_id: d for d in batch}
    logged = [by_id[q].logged(seq) for q, seq in inserted.items()]
    failing = [q for q in dict.fromkeys(failed) if q in inserted]
    seqs = store_failure_rewards(conn, failing, failure_reward, lam)
    rows = {q: by_id[q].row() for q in inserted}
    rewards = [_reward_of(seq, rows[q], failure_reward) for q, seq in seqs.items()]
    early = take_pending_labels(conn, inserted)
    scored = []
    for label in early:
        row = {**rows[label["query_id"]], "reward_seq": seqs.get(label["query_id"])}
        scored.append((row, score(row, label)))
    rewards += store_labels(conn, scored)
    return StoredDecisions(inserted, logged, rewards, len(early))


def store_failure_rewards(
    conn: Connection, query_ids: Sequence[str], reward: float, lam: float
) -> dict[str, int]:
    """Store the reward of decisions whose arm failed, at decision time, each with the next
    reward sequence number; returns them by id. Their labels, when they come, are stored by
    :func:`store_labels` without a reward. Needs :func:`lock_learning_log`."""
    if not query_ids:
        return {}
    result = conn.execute(
        sa.update(decisions)
        .where(
            _one_of(decisions.c.query_id, query_ids),
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


def count_duplicate_labels(conn: Connection, counts: dict[str, int]) -> None:
    """Add to the duplicate-label count of decisions already labeled."""
    if not counts:
        return
    values, params = _arrays(
        query_id=(sa.Text(), list(counts)), n=(sa.Integer(), list(counts.values()))
    )
    conn.execute(
        sa.text(
            "UPDATE decisions AS d SET duplicate_labels = d.duplicate_labels + v.n "
            f"FROM {values} WHERE d.query_id = v.query_id"
        ),
        params,
    )


def add_pending_labels(
    conn: Connection, labels: Sequence[tuple[str, str, datetime | None, int]]
) -> dict[str, bool]:
    """Keep labels whose decision does not exist yet: (query id, label, labeled_at, further
    labels for it in the same batch). The first label kept wins; the others are counted as
    duplicates. Returns, by id, whether the label is newly kept."""
    if not labels:
        return {}
    values, params = _arrays(
        query_id=(sa.Text(), [q for q, _, _, _ in labels]),
        label=(sa.Text(), [lab for _, lab, _, _ in labels]),
        labeled_at=(sa.DateTime(timezone=True), [t for _, _, t, _ in labels]),
        dupes=(sa.Integer(), [n for _, _, _, n in labels]),
    )
    result = conn.execute(
        sa.text(
            "INSERT INTO pending_labels (query_id, label, labeled_at, duplicates) "
            f"SELECT v.query_id, v.label, v.labeled_at, v.dupes FROM {values} "
            "ON CONFLICT (query_id) DO UPDATE "
            "SET duplicates = pending_labels.duplicates + 1 + excluded.duplicates "
            "RETURNING query_id, (xmax = 0) AS kept"
        ),
        params,
    )
    return {q: bool(kept) for q, kept in result}


def add_pending_label(
    conn: Connection, query_id: str, label: str, labeled_at: datetime | None
) -> bool:
    """Keep one label whose decision does not exist yet (see :func:`add_pending_labels`)."""
    return add_pending_labels(conn, [(query_id, label, labeled_at, 0)])[query_id]


def pending_label_ids(conn: Connection, query_ids: Iterable[str]) -> set[str]:
    """Which of these queries have a label waiting for their decision."""
    ids = list(set(query_ids))
    if not ids:
        return set()
    stmt = sa.select(pending_labels.c.query_id).where(_one_of(pending_labels.c.query_id, ids))
    return set(conn.execute(stmt).scalars())


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
    if not after:
        return
    values, params = _arrays(
        topic=(sa.Text(), [t for t, _ in after]),
        part=(sa.Integer(), [p for _, p in after]),
        next_offset=(sa.BigInteger(), list(after.values())),
    )
    conn.execute(
        sa.text(
            "INSERT INTO label_offsets (consumer_group, topic, partition, next_offset) "
            f"SELECT :group, v.topic, v.part, v.next_offset FROM {values} "
            "ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET "
            "next_offset = greatest(label_offsets.next_offset, excluded.next_offset), "
            "updated_at = now()"
        ),
        {**params, "group": group},
    )


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
    """Rewards committed after a watermark, in ``reward_seq`` order: the order every instance
    applies them in (see :func:`lock_learning_log`)."""
    rows = conn.execute(
        sa.select(
            decisions.c.reward_seq,
            decisions.c.query_id,
            decisions.c.arm,
            decisions.c.context,
            decisions.c.reward,
            decisions.c.context_layout,
            sa.func.extract("epoch", sa.func.clock_timestamp() - decisions.c.reward_applied_at),
        )
        .where(decisions.c.reward_seq > watermark)
        .order_by(decisions.c.reward_seq)
    )
    return [
        AppliedReward(seq, qid, arm, bytes_to_vector(ctx), r, layout, float(age or 0.0))
        for seq, qid, arm, ctx, r, layout, age in rows
    ]


class SessionLock:
    """A session-level advisory lock of this schema, on a connection of its own: held for as
    long as that connection lives (a process killed with -9 loses it at once). The service
    elects its one checkpoint writer with it; the other instances only restore."""

    _KEY = "hashtextextended(:n || current_schema(), 0)"  # this schema's lock of that name

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self._key_name = f"metallm-{name}:"
        self._conn: Connection | None = None

    def holder_pid(self, conn: Connection) -> int | None:
        """The backend (``pg_backend_pid``) holding this lock now, from any connection."""
        return conn.execute(
            sa.text(
                f"WITH k AS (SELECT {self._KEY} & ((1::bigint << 32) - 1) AS lo, "
                f"({self._KEY} >> 32) & ((1::bigint << 32) - 1) AS hi) "
                "SELECT l.pid FROM pg_locks l, k WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.objsubid = 1 AND l.classid::bigint = k.hi AND l.objid::bigint = k.lo "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"n": self._key_name},
        ).scalar_one_or_none()

    def try_acquire(self) -> bool:
        """Whether this process holds the lock now (taking it if it is free)."""
        if self._conn is not None:
            try:
                self._conn.execute(sa.text("SELECT 1"))
                return True
            except sa.exc.SQLAlchemyError:  # the connection died, and the lock with it
                self.release()
        conn = self.engine.connect()
        try:
            got = conn.execute(
                sa.text(f"SELECT pg_try_advisory_lock({self._KEY})"), {"n": self._key_name}
            ).scalar_one()
            conn.commit()  # a session lock outlives the transaction
        except BaseException:
            with contextlib.suppress(Exception):
                conn.invalidate()  # never back to the pool: it may hold the lock
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    @property
    def held(self) -> bool:
        return self._conn is not None

    def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):  # gone already
                conn.invalidate()  # closed, not pooled: the session and its lock end
                conn.close()


class LogListener:
    """Wakes when another transaction appended to the learning log (LISTEN/NOTIFY on this
    schema's channel). A missed notification costs only time: callers poll as well.
    Notifications sent by ``ignore`` (an instance's id: its own appends) do not wake it."""

    def __init__(self, engine: Engine, ignore: str | None = None) -> None:
        self.engine = engine
        self.ignore = ignore
        self._conn: Any = None
        self._shut = False

    def _connect(self) -> Any:
        raw = self.engine.raw_connection()
        conn = raw.driver_connection
        raw.detach()  # closed when done, never back to the pool in LISTEN mode
        conn.autocommit = True
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
        channel = psycopg_sql.Identifier(f"{LOG_CHANNEL_PREFIX}{schema}")
        conn.execute(psycopg_sql.SQL("LISTEN {}").format(channel))
        return conn

    @property
    def listening(self) -> bool:
        """Whether it is connected and listening (a NOTIFY from now on wakes it)."""
        return self._conn is not None

    def wait(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for appends; returns how many notifications came. Raises
        the driver's error when Postgres cannot be reached (the next call reconnects)."""
        if self._shut:
            return 0
        if self._conn is None:
            self._conn = self._connect()
        deadline = time.monotonic() + timeout_s
        try:
            n = 0
            while not n and (left := deadline - time.monotonic()) > 0:
                for note in self._conn.notifies(timeout=left, stop_after=1):
                    n += note.payload != self.ignore
            if n:  # drain what else is queued, without waiting
                n += sum(note.payload != self.ignore for note in self._conn.notifies(timeout=0))
            return n
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):  # gone already
                conn.close()

    def shutdown(self) -> None:
        """Close for good (from any thread): a wait in progress ends, none starts again."""
        self._shut = True
        self.close()


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


def decision_events(conn: Connection, query_ids: Iterable[str]) -> list[dict[str, Any]]:
    """What the decision events of these stored decisions carry (:data:`EVENT_COLUMNS`), in
    the order of ``query_ids``."""
    ids = list(dict.fromkeys(query_ids))
    if not ids:
        return []
    cols = [decisions.c[name] for name in EVENT_COLUMNS]
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
