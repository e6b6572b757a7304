"""The broker freezes (SIGSTOP for 10 s, then SIGCONT) while queries and labels stream through:
the service waits it out and resumes; nothing is lost, decided twice or learned twice."""

from __future__ import annotations

import os
import signal
import time

import pytest

from consumers.kafka_io import ensure_topics, make_consumer
from service.log import read_models
from tests.conftest import DATABASE_URL
from tests.faults.harness import (
    ArmServer,
    arm_config,
    build_service,
    make_queries,
    policy_difference,
    progress,
    read_all,
    rebuild_policy,
    wait_consumed,
    wait_until,
)
from tests.faults.test_postgres_outage import ARMS, stream
from tests.helpers import send, settings_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_broker_stopped_for_10_s_mid_stream(own_broker, pg_schema, engine):
    bootstrap = own_broker.bootstrap
    topics = {
        "queries_topic": "q",
        "labels_topic": "l",
        "decisions_topic": "d",
        "dlq_topic": "x",
        "queries_group": "gq",
        "labels_group": "gl",
    }
    queries = make_queries(400, prefix="q-br")
    settings = settings_for(
        bootstrap,
        topics,
        pg_schema,
        DATABASE_URL,
        poll_max_records=25,
        labels_poll_max_records=25,
        checkpoint_every=20,
        checkpoint_min_seconds=0,  # checkpoints taken while the broker is away too
    )
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    with ArmServer({q.query_id: q for q in queries}, {"cheap": 0.6, "strong": 0.9}) as server:
        service = build_service(settings, arm_config(server, ARMS))
        service.start()
        pid = own_broker.process.pid
        try:
            producer = stream(bootstrap, topics, queries, engine)
            wait_until(lambda: progress(engine)[0] >= 100, 60, "100 decisions")
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(10)
                # the consumers are waiting on the broker, not dead
                assert all(t.is_alive() for t in service._threads)
                assert not service.crashed.is_set()
            finally:
                os.kill(pid, signal.SIGCONT)
            producer.join(timeout=120)
            wait_until(lambda: progress(engine) == (400, 400, 0), 120, "400 rewards", interval=0.3)
            wait_consumed(bootstrap, topics, 400, 400)
        finally:
            os.kill(pid, signal.SIGCONT)
            service.stop()
    assert not service.crashed.is_set()
    assert server.calls_by_query() == {q.query_id: 1 for q in queries}
    assert service.live.policy.n_updates == 400
    assert policy_difference(service.live.policy, rebuild_policy(engine)) <= 1e-9
    published = {m.key.decode() for m in read_all(bootstrap, topics["decisions_topic"])}
    assert published == {q.query_id for q in queries}
    assert read_all(bootstrap, topics["dlq_topic"]) == []
    with engine.connect() as conn:  # labels redelivered after the pause are not duplicates
        assert read_models.counters(conn).get("duplicate_labels", 0) == 0


def test_a_consumer_polling_a_frozen_broker_does_not_spin(own_broker):
    """kafka-python's poll, left to itself, runs a round after round without waiting while a
    heartbeat is overdue (the broker frozen), each round leaving its timed-out wait on the fetch
    still in flight: thousands of rounds, and ~6 kB kept by each, for every second of the pause.
    The service's consumer (``make_consumer``) waits ``retry_backoff_ms`` (100 ms) between such
    rounds: a 3 s poll of a frozen broker runs a few dozen rounds at most."""
    topics = {"queries_topic": "q-spin", "labels_topic": "l-spin", "queries_group": "g-spin"}
    settings = settings_for(own_broker.bootstrap, topics, "unused", DATABASE_URL)
    ensure_topics(settings, ["q-spin"], partitions=2)
    send(own_broker.bootstrap, "q-spin", [(f"k{i}", b"{}") for i in range(10)])
    consumer = make_consumer(settings, "q-spin", "g-spin")
    try:
        got: list = []  # joined the group, fetched: a fetch is in flight from now on
        wait_until(
            lambda: got.extend(consumer.poll(500).values()) or sum(map(len, got)) >= 10,
            timeout=60,
            message="the consumer never read the 10 events",
        )
        pid = own_broker.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            before = consumer.rounds
            assert consumer.poll(timeout_ms=3000) == {}
            rounds = consumer.rounds - before
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        consumer.close()
    assert rounds <= 60, f"{rounds} poll rounds in 3 s against a frozen broker"
