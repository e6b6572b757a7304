"""The query consumer polls and embeds the next batch while it handles this one (look-ahead).

Against the real broker and Postgres: the next batch is embedded before this one is stored;
batches are still decided and committed in offset order; a transient failure rewinds both the
failed batch and the one polled ahead; an event failing on its own is dead-lettered and the
batch polled ahead goes on after it. Each query is decided once, whatever happens.
"""

from __future__ import annotations

import json
import threading

import pytest
import sqlalchemy as sa

from consumers.kafka_io import ensure_topics
from tests.conftest import DATABASE_URL, wait_for
from tests.helpers import (
    committed_offset,
    demo_rows,
    query_bytes,
    read_topic,
    replay_config,
    send,
    settings_for,
    write_outcomes,
)
from tests.test_service_e2e import ARMS, build_service, count

pytestmark = pytest.mark.integration

N = 60
BATCH = 8


def start(broker, topics, pg_schema, embedder, tmp_path, rows):
    config = replay_config(write_outcomes(tmp_path / "o.jsonl", rows, ARMS), list(ARMS))
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL, poll_max_records=BATCH)
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    send(broker, topics["queries_topic"], [(r["query_id"], query_bytes(r)) for r in rows])
    return build_service(settings, config, embedder)


def decided_in_order(engine) -> list[int]:
    """Kafka offsets of the decisions, in the order they were stored."""
    with engine.connect() as conn:
        return list(
            conn.execute(sa.text("SELECT kafka_offset FROM decisions ORDER BY decision_seq"))
            .scalars()
            .all()
        )


def test_the_next_batch_is_embedded_while_this_one_is_handled(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    rows = demo_rows(N)
    service = start(broker, topics, pg_schema, embedder, tmp_path, rows)
    log: list[tuple[str, str]] = []  # ("ahead" | "stored", first query id of the batch)
    lock = threading.Lock()
    embed_ahead, decide = service.decider.embed_ahead, service.decider.decide

    def logged_embed_ahead(texts):
        with lock:
            log.append(("ahead", texts[0] if texts else ""))
        embed_ahead(texts)

    def logged_decide(records):
        out = decide(records)
        with lock:
            log.append(("stored", records[0].event.text))
        return out

    service.decider.embed_ahead = logged_embed_ahead
    service.decider.decide = logged_decide
    service.start()
    try:
        wait_for(lambda: count(engine, "SELECT count(*) FROM decisions") == N, message="all")
    finally:
        service.stop()

    # some batch was submitted for embedding before the batch before it was stored
    stored = [text for what, text in log if what == "stored"]
    ahead = [text for what, text in log if what == "ahead"]
    assert len(stored) >= 2
    overlapped = [
        k
        for k in range(1, len(stored))
        if stored[k] in ahead
        and log.index(("ahead", stored[k])) < log.index(("stored", stored[k - 1]))
    ]
    assert overlapped, log
    # nearly every text was embedded in the background, none twice
    assert service.decider.ahead.submitted >= N - BATCH
    assert service.decider.ahead.submitted + service.decider.ahead.inline <= N
    # decided once each, stored in offset order, all offsets committed
    assert decided_in_order(engine) == list(range(N))
    assert committed_offset(broker, topics["queries_topic"], topics["queries_group"]) == N


def test_a_transient_failure_rewinds_the_batch_and_the_one_polled_ahead(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    rows = demo_rows(N)
    service = start(broker, topics, pg_schema, embedder, tmp_path, rows)
    decide = service.decider.decide
    failed: list[int] = []

    def flaky_decide(records):
        # the third batch fails once, after the fourth was polled ahead and embedded
        if not failed and records[0].offset >= 2 * BATCH:
            failed.append(records[0].offset)
            raise sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection"))
        return decide(records)

    service.decider.decide = flaky_decide
    service.start()
    try:
        wait_for(lambda: count(engine, "SELECT count(*) FROM decisions") == N, message="all")
        wait_for(
            lambda: committed_offset(broker, topics["queries_topic"], topics["queries_group"]) == N,
            message="offsets committed",
        )
    finally:
        service.stop()
    assert failed
    assert service.queries.stats.failures >= 1
    assert decided_in_order(engine) == list(range(N))  # nothing skipped, nothing reordered


def test_an_event_failing_on_its_own_is_dead_lettered_and_the_next_batch_follows(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    rows = demo_rows(N)
    poison = rows[2 * BATCH + 3]["query_id"]
    service = start(broker, topics, pg_schema, embedder, tmp_path, rows)
    decide = service.decider.decide

    def poisoned_decide(records):
        if any(r.event.query_id == poison for r in records):
            raise ValueError(f"cannot decide {poison}")
        return decide(records)

    service.decider.decide = poisoned_decide
    service.start()
    try:
        wait_for(lambda: count(engine, "SELECT count(*) FROM decisions") == N - 1, message="all")
        dead = read_topic(broker, topics["dlq_topic"], 1)
        wait_for(
            lambda: committed_offset(broker, topics["queries_topic"], topics["queries_group"]) == N,
            message="offsets committed",
        )
    finally:
        service.stop()
    assert [json.loads(d.value)["offset"] for d in dead] == [2 * BATCH + 3]
    assert "processing failed: ValueError" in json.loads(dead[0].value)["reason"]
    assert decided_in_order(engine) == [i for i in range(N) if i != 2 * BATCH + 3]
