"""The database's schema: the tables, the engine, and how values are bound (SQLAlchemy 2 Core
over psycopg 3). The schema is made by the Alembic migrations; :data:`metadata` declares the
same tables, exactly (``tests/test_schema.py``). The statements that read and write them are
the learning log's (:mod:`service.log`).

Every statement uses bound parameters. A ``schema`` puts all of metallm's tables in one
Postgres schema (through ``search_path``), which is how tests keep to themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine

# the codec of ``decisions.context``, named here too for the code that writes rows by hand
from service.decision import bytes_to_vector, vector_to_bytes  # noqa: F401

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
    # the λ a priced choice was made at, and the chosen arm's cost estimated before the call
    # (NULL: a policy that does not price its choices, or a decision from before 0009)
    sa.Column("decision_lambda", sa.Float),
    sa.Column("estimated_cost_usd", sa.Float),
    # the score in [0, 1] its feedback gave: a score event, or an open task's check of its
    # label (NULL: no feedback yet, a label's verdict is ``correct``, or before 0010)
    sa.Column("score", sa.Float),
    # the time the call queued for a free slot (latency_ms is the call's own; NULL: before 0011)
    sa.Column("wait_ms", sa.Float),
    sa.UniqueConstraint("reward_seq", name="decisions_reward_seq_key"),
    sa.UniqueConstraint("decision_seq", name="decisions_decision_seq_key"),
    sa.CheckConstraint("propensity > 0 AND propensity <= 1", name="propensity_in_0_1"),
    sa.CheckConstraint(
        "status IN ('ok', 'parse_error', 'llm_error', 'input_too_long')", name="known_status"
    ),
    sa.CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    sa.CheckConstraint("score >= 0 AND score <= 1", name="score_in_0_1"),
    sa.Index("decisions_decided_at", "decided_at"),
    sa.Index("decisions_arm_task", "arm", "task"),
)

pending_labels = sa.Table(
    "pending_labels",
    metadata,
    # one row per different early label of a query, in arrival order (0013)
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("query_id", sa.Text, nullable=False),
    sa.Column("label", sa.Text),  # NULL: a score waits instead (0010)
    sa.Column("labeled_at", sa.DateTime(timezone=True)),
    sa.Column(
        "received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("duplicates", sa.Integer, nullable=False, server_default="0"),
    # where the label came from (NULL: kept before 0008, or applied without its Kafka place)
    sa.Column("topic", sa.Text),
    sa.Column("partition", sa.Integer),
    sa.Column("kafka_offset", sa.BigInteger),
    sa.Column("score", sa.Float),
    sa.CheckConstraint("num_nonnulls(label, score) = 1", name="label_or_score"),
    sa.Index("pending_labels_received_at", "received_at"),
    sa.Index("pending_labels_query_id", "query_id"),
)

# early labels found outside their decision's label set when it arrived: recorded, not applied
rejected_labels = sa.Table(
    "rejected_labels",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("query_id", sa.Text, nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("topic", sa.Text),
    sa.Column("partition", sa.Integer),
    sa.Column("kafka_offset", sa.BigInteger),
    sa.Column(
        "rejected_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Index("rejected_labels_query_id", "query_id"),
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

# query ids the HTTP door reserved before calling (door/, service/log/requests.py): a retry
# with the same id and body waits for or returns that decision; a lease bounds a dead owner
http_requests = sa.Table(
    "http_requests",
    metadata,
    sa.Column("query_id", sa.Text, primary_key=True),
    sa.Column("body_sha256", sa.Text, nullable=False),
    sa.Column("instance", sa.Text, nullable=False),
    sa.Column(
        "reserved_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=False),
    sa.Column("token", sa.Uuid(as_uuid=False), nullable=True),  # the holding request's
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


def one_of(column: sa.ColumnElement[str], values: Iterable[str]) -> sa.ColumnElement[bool]:
    """``column = ANY(%s)``, the values bound as one text array: the same statement for any
    number of values. ``IN`` binds a parameter each, and psycopg parses a statement of over 50
    parameters afresh on every call."""
    return column == sa.any_(sa.literal(list(values), postgresql.ARRAY(sa.Text)))


def arrays(**columns: tuple[sa.types.TypeEngine, list[Any]]) -> tuple[str, dict[str, Any]]:
    """``unnest(...) AS v(name, ...)`` over bound arrays, one per column, and its parameters:
    one statement for any number of rows."""
    dialect = postgresql.dialect()
    casts = ", ".join(f"CAST(:{n} AS {t.compile(dialect)}[])" for n, (t, _) in columns.items())
    params = {name: values for name, (_, values) in columns.items()}
    return f"unnest({casts}) AS v({', '.join(columns)})", params


def unreachable(exc: BaseException) -> bool:
    """Whether a failure is about reaching Postgres (the same statements again can succeed),
    not about what they store: the one rule the Kafka consumers and the HTTP door retry by.

    >>> unreachable(ValueError("no")), unreachable(ConnectionError())
    (False, True)
    """
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    return isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError | ConnectionError)
