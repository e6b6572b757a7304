"""The broker freezes (SIGSTOP for 10 s, then SIGCONT) while queries and labels stream through:
the service waits it out and resumes; nothing is lost, decided twice or learned twice."""

from __future__ import annotations

import os
import signal
import time

import pytest

from consumers.kafka_io import ensure_topics
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
from tests.helpers import settings_for

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
