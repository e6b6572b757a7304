"""Decision rows written and looked up by id, against the real Postgres."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql

from consumers.failures import is_transient
from service import storage
from service.log import decisions as decision_sql
from service.log import labels as label_sql
from service.log import transaction

pytestmark = pytest.mark.integration


def full_row(query_id: str, **changes) -> dict:
    """A row with every column the decider writes."""
    row = {
        "query_id": query_id,
        "task": "sentiment",
        "text": "a 'quoted' text; with %s and %(x)s in it",
        "options": ["positive", "negative"],
        "metadata": {"source": "test", "n": 3},
        "sent_at": datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
        "decided_at": datetime(2026, 11, 28, 12, 0, 1, 500, tzinfo=UTC),
        "arm": "small",
        "propensity": 0.93,
        "probabilities": {"small": 0.93, "large": 0.07},
        "policy": "linucb",
        "status": "ok",
        "prediction": "positive",
        "raw_output": "Positive.",
        "error": None,
        "input_tokens": 41,
        "output_tokens": 2,
        "cost_usd": 4.9e-6,
        "latency_ms": 3.25,
        "attempts": 1,
        "fallback_arm": None,
        "answer_scores": {"positive": -0.1, "negative": -2.5},
        "arm_scores": {"small": 0.5, "large": 0.4},
        "embedding_model": "all-MiniLM-L6-v2",
        "context": storage.vector_to_bytes(np.linspace(-1, 1, 384, dtype=np.float32)),
        "context_layout": "legacy",
        "kafka_partition": 1,
        "kafka_offset": 2**40,
    }
    return {**row, **changes}


def stored(engine, query_id: str) -> dict:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(storage.decisions).where(storage.decisions.c.query_id == query_id)
        ).one()
    return dict(row._mapping)


def raw_json(engine, query_id: str, column: str) -> str | None:
    """A JSONB column as Postgres holds it: SQL NULL is None, JSON null is 'null'."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text(f"SELECT {column}::text FROM decisions WHERE query_id = :q"), {"q": query_id}
        ).scalar_one()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        # Nones in JSONB columns: JSON null where SQLAlchemy writes it, SQL NULL where the
        # column says none_as_null; and the other columns' NULLs
        {"metadata": None, "answer_scores": None, "arm_scores": None, "probabilities": None},
        {"sent_at": None, "prediction": None, "raw_output": None, "input_tokens": None},
        {"options": [], "metadata": {"nested": {"list": [1, 2.5, None, "é"]}}},
    ],
    ids=["every-column", "json-nones", "sql-nones", "json-shapes"],
)
def test_rows_are_stored_as_sqlalchemy_stores_them(engine, changes):
    """The same row, through insert_decisions and through SQLAlchemy's own INSERT, reads back
    the same, column by column (JSON null and SQL NULL told apart)."""
    ours, reference = full_row("ours", **changes), full_row("reference", **changes)
    with engine.begin() as conn:
        assert decision_sql.insert_decisions(conn, [ours]).keys() == {"ours"}
        conn.execute(postgresql.insert(storage.decisions), [reference])
    a, b = stored(engine, "ours"), stored(engine, "reference")
    for column in ("query_id", "decision_seq"):
        a.pop(column), b.pop(column)
    assert a == b
    assert a["context"] == ours["context"]
    for column in ("options", "metadata", "probabilities", "answer_scores", "arm_scores"):
        assert raw_json(engine, "ours", column) == raw_json(engine, "reference", column), column


def test_a_query_decided_before_is_left_alone_and_not_returned(engine):
    with engine.begin() as conn:
        first = decision_sql.insert_decisions(conn, [full_row("q1"), full_row("q2")])
    with engine.begin() as conn:
        inserted = decision_sql.insert_decisions(
            conn,
            [full_row("q0"), full_row("q1", arm="large"), full_row("q2"), full_row("q3")],
        )
    assert inserted.keys() == {"q0", "q3"}
    assert first.keys() == {"q1", "q2"}
    # each its own row's decision_seq, new ones after the old
    for query_id, seq in [*first.items(), *inserted.items()]:
        assert stored(engine, query_id)["decision_seq"] == seq
    assert min(inserted.values()) > max(first.values())
    assert stored(engine, "q1")["arm"] == "small"  # the first decision stands
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM decisions")).scalar_one() == 4


def test_rows_written_in_a_transaction_roll_back_with_it(engine):
    """The insert takes part in the caller's transaction, like every other statement."""
    with pytest.raises(RuntimeError), engine.begin() as conn:
        decision_sql.insert_decisions(conn, [full_row("q1")])
        raise RuntimeError("the batch failed after its insert")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM decisions")).scalar_one() == 0


def test_columns_left_out_take_their_defaults_and_unknown_ones_are_named(engine):
    left_out = ("decided_at", "attempts", "duplicate_labels")
    row = {k: v for k, v in full_row("q1").items() if k not in left_out}
    with engine.begin() as conn:
        decision_sql.insert_decisions(conn, [row])
    got = stored(engine, "q1")
    assert got["decided_at"] is not None and got["decision_seq"] is not None
    assert (got["attempts"], got["duplicate_labels"]) == (1, 0)
    with pytest.raises(KeyError, match="no column colour"), engine.begin() as conn:
        decision_sql.insert_decisions(conn, [{**row, "query_id": "q2", "colour": "red"}])


def test_lookups_by_id_take_any_number_of_ids(engine):
    """existing_query_ids and take_pending_labels, with more ids than psycopg would cache a
    statement's parsing for (50): they are bound as one array."""
    ids = [f"q{i}" for i in range(300)]
    with engine.begin() as conn:
        seqs = decision_sql.insert_decisions(
            conn, [full_row(q, cost_usd=i) for i, q in enumerate(ids)]
        )
        for q in ("q4", "elsewhere"):
            label_sql.add_pending_label(conn, q, "positive", datetime.now(UTC))
    asked = [*ids[::2], "missing", "it's"]
    with engine.begin() as conn:
        assert decision_sql.existing_query_ids(conn, asked) == set(ids[::2])
        assert decision_sql.existing_query_ids(conn, []) == set()
        logged = transaction.decision_log(conn, after=seqs["q99"])
        assert [d.cost_usd for d in logged] == [float(i) for i in range(100, 300)]
        text = full_row("x")["text"]
        assert {(d.task, d.n_chars) for d in logged} == {("sentiment", len(text))}
        assert all(d.metadata == full_row("x")["metadata"] for d in logged)
        assert [p.query_id for p in label_sql.take_pending_labels(conn, asked)] == ["q4"]
        assert label_sql.take_pending_labels(conn, asked) == []  # taken: deleted


def test_a_lost_connection_is_a_transient_sqlalchemy_error(engine):
    """Postgres gone mid-insert reads as it does for every other statement: a SQLAlchemy
    error with the connection invalidated, which the consumers retry (not dead-letter);
    the pool then hands out a working connection."""
    with engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with storage.make_engine(str(engine.url)).connect() as killer:
            killer.execute(sa.text("SELECT pg_terminate_backend(:p, 5000)"), {"p": pid})  # gone
        with pytest.raises(sa_exc.DBAPIError) as caught:
            decision_sql.insert_decisions(conn, [full_row("q1")])
    assert caught.value.connection_invalidated
    assert is_transient(caught.value)
    with engine.begin() as conn:
        assert decision_sql.insert_decisions(conn, [full_row("q1")]).keys() == {"q1"}


def test_a_bad_row_is_an_integrity_error_and_not_transient(engine):
    with pytest.raises(sa_exc.IntegrityError) as caught, engine.begin() as conn:
        decision_sql.insert_decisions(conn, [full_row("q1", text=None)])  # text is NOT NULL
    assert not caught.value.connection_invalidated
    assert not is_transient(caught.value)
    assert "text" in str(caught.value.orig)  # the driver's message names the column


def test_rows_are_committed_by_a_plain_connection_commit(engine):
    """Like any statement, the insert starts the connection's transaction, so commit() keeps
    it (the driver's cursor alone would not tell SQLAlchemy a transaction was begun)."""
    with engine.connect() as conn:
        assert decision_sql.insert_decisions(conn, [full_row("q1")]).keys() == {"q1"}
        conn.commit()
    assert stored(engine, "q1")["arm"] == "small"
