"""A SIGTERM that lands while the queries group rebalances (a second instance joining): the
stopped instance finishes what it holds, completes the rebalance (Tansu stalls a group whose
member leaves between revocation and assignment: the other's join waited for the rebalance
timeout, ten minutes) and exits 0 within seconds; the other instance decides every query."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from kafka import KafkaConsumer

from consumers.batch import BatchConsumer
from consumers.kafka_io import create_topics
from tests.conftest import DATABASE_URL
from tests.faults.harness import (
    ArmServer,
    ServiceProcess,
    arm_config,
    make_queries,
    progress,
    publish,
    service_env,
    wait_until,
    write_config,
)
from tests.faults.test_postgres_outage import ARMS

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_sigterm_during_a_rebalance_exits_cleanly(broker, topics, pg_schema, tmp_path, engine):
    """The arms hold the first instance's calls until it is sent SIGTERM: the rebalance reaches
    it while it holds them, and cannot end before they are answered."""
    queries = make_queries(30, prefix="q-sr")
    # two polls of 5: with room for a third, the first instance polls on, so hears of the
    # rebalance (with its hand full it would stop polling, and the rebalance would wait)
    held, later = queries[:10], queries[10:]
    create_topics(broker, [t for k, t in topics.items() if k.endswith("_topic")], 6)
    with ArmServer({q.query_id: q for q in queries}, {"cheap": 0.6, "strong": 0.9}) as server:
        no_timeout = {arm: {"timeout_seconds": 120} for arm in ARMS}  # the calls wait for us
        config = write_config(tmp_path / "config.yaml", arm_config(server, ARMS, **no_timeout))
        env = service_env(broker, topics, DATABASE_URL, pg_schema, config, poll_max_records=5)
        first = ServiceProcess({**env, "METALLM_INSTANCE_ID": "a"}, tmp_path / "a.log").start()
        second = ServiceProcess(
            {**env, "METALLM_INSTANCE_ID": "b"}, tmp_path / "b.log", standby=True
        ).start()
        try:
            wait_until(lambda: first.serving, 60, "the first instance serving")
            server.answering.clear()
            publish(
                broker, topics["queries_topic"], [(q.query_id.encode(), q.event()) for q in held]
            )
            wait_until(lambda: server.in_flight == len(held), 60, "the held queries' calls")
            second.go()
            # the rebalance reaches the first instance: it finishes what it holds first, so
            # the rebalance cannot end before the calls are answered
            wait_until(lambda: "rebalance takes" in first.log(), 60, "the rebalance")
            assert "finishing the 10 events held first" in first.log()
            first.process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            wait_until(lambda: "received SIGTERM" in first.log(), 10, "the SIGTERM handled")
            assert first.log().count("queries: assigned") == 1  # during the rebalance
            server.answering.set()
            assert first.process.wait(timeout=60) == 0, first.log()[-3000:]
            assert time.monotonic() - stopped < 30
            assert first.log().count("queries: assigned") == 2  # it completed the rebalance
            publish(
                broker, topics["queries_topic"], [(q.query_id.encode(), q.event()) for q in later]
            )
            wait_until(lambda: progress(engine)[0] == len(queries), 90, "every query decided")
        finally:
            server.answering.set()
            first.kill()
            second.kill()
        calls = server.calls_by_query()
    assert calls == {q.query_id: 1 for q in queries}
    assert "Traceback" not in first.log() + second.log()
    assert "queries: assigned" in second.log()


class Idle(BatchConsumer):
    """A consumer that handles nothing: only its group membership is under test."""

    def validate(self, raw):
        return raw

    def handle(self, items):
        return []


def member(broker: str, topic: str, group: str) -> Idle:
    consumer = KafkaConsumer(
        topic,
        group_id=group,
        enable_auto_commit=False,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        max_poll_interval_ms=600_000,  # the rebalance timeout: what a stalled join waits
        bootstrap_servers=[broker],
    )
    return Idle(consumer, None, "dlq")  # type: ignore[arg-type]


@pytest.mark.parametrize("unheard_s", [0.3, 1.5])
def test_a_stop_before_the_rebalance_reached_the_consumer_joins_it_before_leaving(
    broker, topics, unheard_s
):
    """A member joins while the stopping consumer is not polling (its loop ended): the
    consumer never heard of the rebalance (0.3 s: before its heartbeat could tell it; 1.5 s:
    its heartbeat did, but no poll acted on it). Leaving then stalled Tansu's group: the new
    member's join waited for the rebalance timeout (ten minutes). Now it joins the rebalance,
    then leaves, and the new member is assigned every partition within seconds."""
    topic, group = topics["queries_topic"], topics["queries_group"]
    create_topics(broker, [topic], 6)
    old = member(broker, topic, group)
    wait_until(lambda: old.consumer.poll(timeout_ms=100) or old.consumer.assignment(), 30, "a")
    assert not old.rebalancing
    new = member(broker, topic, group)
    polling = threading.Event()
    polling.set()
    thread = threading.Thread(
        target=lambda: [new.consumer.poll(timeout_ms=100) for _ in iter(polling.is_set, False)]
    )
    thread.start()
    try:
        wait_until(lambda: new.rebalancing, 10, "the new member joining")
        time.sleep(unheard_s)
        assert not old.rebalancing  # not told: it did not poll since
        began = time.monotonic()
        old.leave(10)
        assert time.monotonic() - began < 12
        wait_until(lambda: len(new.consumer.assignment()) == 6, 20, "the new member assigned")
    finally:
        polling.clear()
        thread.join(10)
        new.consumer.close(timeout_ms=5000)
