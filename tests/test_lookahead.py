"""The query consumer polls the next two batches and calls their LLMs while it stores this one.

Against the real broker and Postgres: the next batches' calls start before this one is stored;
a transient failure rewinds every event held (the failed group and the batches polled after
it); an event failing on its own is dead-lettered and the batches polled ahead go on after it;
a stop finishes every batch held. Each query is decided once and called once, whatever
happens, and the offsets committed cover exactly the queries stored. (Group commit stores
queries as their calls end, not in offset order: ``tests/faults/test_group_commit.py``.)
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from consumers.batch import BatchConsumer
from consumers.kafka_io import ensure_topics, make_consumer, make_producer
from tests.conftest import DATABASE_URL, wait_for
from tests.helpers import (
    ARMS,
    build_service,
    committed_offset,
    count,
    demo_rows,
    query_bytes,
    read_topic,
    replay_config,
    send,
    settings_for,
    write_outcomes,
)

pytestmark = pytest.mark.integration

N = 60
BATCH = 8


def start(broker, topics, pg_schema, embedder, tmp_path, rows):
    config = replay_config(write_outcomes(tmp_path / "o.jsonl", rows, ARMS), list(ARMS))
    # 1 partition: these tests follow batches by their offsets in one total order (the third
    # batch starts at offset 2 * BATCH; decisions are stored in offset order 0..N-1)
    settings = settings_for(
        broker, topics, pg_schema, DATABASE_URL, poll_max_records=BATCH, topic_partitions=1
    )
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


def test_the_next_batch_is_called_while_this_one_is_stored(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    rows = demo_rows(N)
    service = start(broker, topics, pg_schema, embedder, tmp_path, rows)
    # ("ahead", batch) when a batch is polled and its calls start; ("stored", batch) each time
    # a group holding some of that batch's queries is stored (group commit stores a batch's
    # queries as their calls end, so one batch may be stored in several groups)
    log: list[tuple[str, int]] = []
    called: list[str] = []
    batch_of: dict[str, int] = {}  # query id → batch (the order its calls were started)
    in_flight: dict[str, int] = {}
    overlaps: list[tuple[int, int]] = []  # (batch, batch) with calls in flight together
    lock = threading.Lock()
    decide, call = service.decider.decide, service.decider.gateway.call
    call_ahead = service.decider.call_ahead

    def logged_call_ahead(events):
        with lock:
            batch = len({*batch_of.values()})
            batch_of.update({e.query_id: batch for e in events})
            log.append(("ahead", batch))
        call_ahead(events)

    async def logged_call(arm, request):  # a model that takes 0.3 s to answer
        qid = request.query_id
        with lock:
            called.append(qid)
            mine = batch_of.setdefault(qid, -1)
            overlaps.extend({(b, mine) for b in in_flight.values() if b != mine})
            in_flight[qid] = mine
        await asyncio.sleep(0.3)
        try:
            return await call(arm, request)
        finally:
            with lock:
                del in_flight[qid]

    def logged_decide(records):
        out = decide(records)
        with lock:
            log.extend(
                ("stored", b) for b in sorted({batch_of.get(r.event.query_id, -1) for r in records})
            )
        return out

    service.decider.gateway.call = logged_call
    service.decider.decide = logged_decide
    service.decider.call_ahead = logged_call_ahead
    calls_before = service.decider.llm_calls
    service.start()
    try:
        wait_for(lambda: count(engine, "SELECT count(*) FROM decisions") == N, message="all")
    finally:
        service.stop()

    # batches were called ahead: before the batch before them (and the one before that) was
    # wholly stored; and the calls of two batches were in flight together
    ahead_at = {b: i for i, (what, b) in enumerate(log) if what == "ahead"}
    stored_at = {b: i for i, (what, b) in enumerate(log) if what == "stored"}  # the last group
    assert len(stored_at) >= 3, log
    polled_ahead = [b for b in ahead_at if b >= 1 and ahead_at[b] < stored_at[b - 1]]
    assert polled_ahead, log
    two_ahead = [b for b in ahead_at if b >= 2 and ahead_at[b] < stored_at[b - 2]]
    assert two_ahead, log
    assert overlaps, log
    # every query called once (none twice, none wasted), embedded once
    assert sorted(called) == sorted(r["query_id"] for r in rows)
    assert service.decider.llm_calls - calls_before == N
    assert service.decider.vectors.misses <= N
    # decided once each, all offsets committed
    assert sorted(decided_in_order(engine)) == list(range(N))
    assert committed_offset(broker, topics["queries_topic"], topics["queries_group"]) == N


def test_a_stop_finishes_the_batch_polled_ahead_and_a_restart_calls_nothing_twice(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    rows = demo_rows(N)
    service = start(broker, topics, pg_schema, embedder, tmp_path, rows)
    call = service.decider.gateway.call
    called: list[str] = []
    lock = threading.Lock()

    async def logged_call(arm, request):
        with lock:
            called.append(request.query_id)
        return await call(arm, request)

    decide = service.decider.decide
    batches: list[int] = []

    def decide_then_stop(records):
        out = decide(records)
        batches.append(len(records))
        if len(batches) == 3:  # stop polling now: the batches held have been called
            service.queries.stop()
        return out

    service.decider.gateway.call = logged_call
    service.decider.decide = decide_then_stop
    service.start()
    try:
        wait_for(lambda: len(batches) >= 3)
    finally:
        service.stop()
    first = count(engine, "SELECT count(*) FROM decisions")
    assert len(batches) == 4, batches  # the three, then every event held, in one group
    assert first < N, "the stop came too late to test anything"
    # every call made was stored (the batches held were finished), offsets follow
    assert sorted(called) == sorted(r["query_id"] for r in rows[:first])
    assert sorted(decided_in_order(engine)) == list(range(first))
    assert committed_offset(broker, topics["queries_topic"], topics["queries_group"]) == first

    config = replay_config(tmp_path / "o.jsonl", list(ARMS))
    again = build_service(service.settings, config, embedder)
    call = again.decider.gateway.call
    again.decider.gateway.call = logged_call
    again.start()
    try:
        wait_for(lambda: count(engine, "SELECT count(*) FROM decisions") == N, message="all")
    finally:
        again.stop()
    assert sorted(called) == sorted(r["query_id"] for r in rows)  # nobody called twice
    assert sorted(decided_in_order(engine)) == list(range(N))


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
    assert sorted(decided_in_order(engine)) == list(range(N))  # nothing skipped


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
    assert sorted(decided_in_order(engine)) == [i for i in range(N) if i != 2 * BATCH + 3]


class FailsOn(BatchConsumer):
    """Handles string events, keeping each batch handled; a batch holding ``failing`` fails as
    if Postgres were down."""

    def __init__(self, *args, failing: str) -> None:
        super().__init__(*args)
        self.failing = failing
        self.handled: list[list[str]] = []

    def validate(self, raw):
        return raw.decode()

    def handle(self, items):
        values = [value for value, _ in items]
        if self.failing in values:
            raise sa.exc.OperationalError("INSERT", {}, Exception("server closed"))
        self.handled.append(values)
        return []


@contextmanager
def all_polled(
    broker, topics, pg_schema, values: dict[int, list[str]], failing: str
) -> Iterator[tuple[FailsOn, dict[tuple[int, int], ConsumerRecord]]]:
    """A fresh topic holding ``values`` by partition, and a :class:`FailsOn` consumer that has
    polled every one of them (records by (partition, offset))."""
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL, poll_max_records=100)
    topic = topics["queries_topic"]
    ensure_topics(settings, [topic], partitions=len(values))
    producer = make_producer(settings)
    for partition, events in values.items():
        for value in events:
            producer.send(topic, value=value.encode(), partition=partition)
    producer.flush()
    consumer = make_consumer(settings, topic, topics["queries_group"])
    handler = FailsOn(consumer, producer, topics["dlq_topic"], failing=failing)
    try:
        polled: list[ConsumerRecord] = []
        total = sum(len(events) for events in values.values())
        wait_for(lambda: polled.extend(handler.poll(500)) or len(polled) == total, message="all")
        yield handler, {(r.partition, r.offset): r for r in polled}
    finally:
        consumer.close()
        producer.close()


def test_a_one_at_a_time_retry_cut_short_rewinds_the_batch_polled_ahead_on_every_partition(
    broker, topics, pg_schema
):
    """Two partitions, ten events each, all polled (positions at 10). A batch [p0@0, p1@0]
    with [p0@1, p1@1] polled ahead is retried one event at a time: p0@0 is handled and
    committed, then p1@0 meets Postgres down. Each partition must go back to its first event
    not handled: p1 to 0, and p0 to 1 (its position had passed its events polled ahead)."""
    values = {p: [f"{p}-{i}" for i in range(10)] for p in (0, 1)}
    with all_polled(broker, topics, pg_schema, values, failing="1-0") as (handler, at):
        p0, p1 = (TopicPartition(topics["queries_topic"], p) for p in (0, 1))
        consumer = handler.consumer
        assert consumer.position(p0) == consumer.position(p1) == 10
        with pytest.raises(sa.exc.OperationalError):
            handler.isolate([at[0, 0], at[1, 0]], [at[0, 1], at[1, 1]])
        assert handler.handled == [["0-0"]]
        assert consumer.committed(p0) == 1  # p0@0 handled
        assert (consumer.position(p0), consumer.position(p1)) == (1, 0)


def test_on_stop_the_batches_polled_ahead_are_finished_in_order_up_to_the_first_failing(
    broker, topics, pg_schema
):
    """Stopping with two batches polled ahead: the first is handled and committed; the second
    fails (Postgres down), so it is left uncommitted and the consumer is sought back to it,
    and the third, after it, is not handled at all."""
    with all_polled(broker, topics, pg_schema, {0: list("012345")}, failing="2") as (handler, at):
        handler.finish([[at[0, 0], at[0, 1]], [at[0, 2], at[0, 3]], [at[0, 4], at[0, 5]]])
        assert handler.handled == [["0", "1"]]
        tp = TopicPartition(topics["queries_topic"], 0)
        assert handler.consumer.committed(tp) == 2  # the first batch, and no further
        assert handler.consumer.position(tp) == 2  # the next start polls the failed batch again
        assert handler.stats.failures == 1


def test_a_rebalance_finishes_the_batches_held_so_no_query_is_called_twice(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    """Instance A decides alone, with calls slow enough that it always holds the batch in hand
    and two polled ahead (their calls in flight); instance B joins the group mid-stream and
    takes one of the two partitions. Before A gives it up, it stores and commits what it
    holds of it, so B starts after those queries: every query is called once, by one
    instance. (Dropping the held events of the revoked partition instead let B call them a
    second time.)"""
    rows = demo_rows(160)  # twenty batches, one at a time: ~16 s for A alone
    config = replay_config(write_outcomes(tmp_path / "o.jsonl", rows, ARMS), list(ARMS))
    settings = settings_for(
        broker, topics, pg_schema, DATABASE_URL, poll_max_records=BATCH, topic_partitions=2
    )
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    send(broker, topics["queries_topic"], [(r["query_id"], query_bytes(r)) for r in rows])
    called: list[str] = []
    lock = threading.Lock()

    def slow(service):
        call = service.decider.gateway.call
        one_batch_at_a_time: asyncio.Semaphore | None = None

        async def slow_call(arm, request):
            nonlocal one_batch_at_a_time
            with lock:
                called.append(request.query_id)
            one_batch_at_a_time = one_batch_at_a_time or asyncio.Semaphore(BATCH)
            async with one_batch_at_a_time:  # ~8 s of work for A alone: B joins meanwhile
                await asyncio.sleep(0.8)
            return await call(arm, request)

        service.decider.gateway.call = slow_call
        return service

    a = slow(build_service(settings.model_copy(update={"instance_id": "a"}), config, embedder))
    b = slow(build_service(settings.model_copy(update={"instance_id": "b"}), config, embedder))
    a.start()
    try:
        wait_for(lambda: count(engine, "SELECT count(*) FROM decisions") >= BATCH, message="A")
        b.start()
        wait_for(lambda: count(engine, "SELECT count(*) FROM decisions") == 160, message="all")
    finally:
        a.stop()
        b.stop()
    assert sorted(called) == sorted(r["query_id"] for r in rows)  # each once
    with engine.connect() as conn:
        by = dict(
            conn.execute(sa.text("SELECT instance, count(*) FROM decisions GROUP BY 1")).all()
        )
    assert set(by) == {"a", "b"} and sum(by.values()) == 160
