"""A SIGTERM that lands while the queries group rebalances (a second instance joining): the
stopped instance finishes what it holds, completes the rebalance (Tansu stalls a group whose
member leaves between revocation and assignment: the other's join waited for the rebalance
timeout, ten minutes) and exits 0 within seconds; the other instance decides every query."""

from __future__ import annotations

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
    queries = make_queries(120, prefix="q-sr")
    create_topics(broker, [t for k, t in topics.items() if k.endswith("_topic")], 6)
    with ArmServer({q.query_id: q for q in queries}, {"cheap": 0.6, "strong": 0.9}) as server:
        for arm in server.modes:  # slow arms: the first instance holds calls at the rebalance
            server.modes[arm], server.delay[arm] = "slow", 0.3
        config = write_config(tmp_path / "config.yaml", arm_config(server, ARMS))
        env = service_env(broker, topics, DATABASE_URL, pg_schema, config, poll_max_records=5)
        first = ServiceProcess({**env, "METALLM_INSTANCE_ID": "a"}, tmp_path / "a.log").start()
        second = ServiceProcess(
            {**env, "METALLM_INSTANCE_ID": "b"}, tmp_path / "b.log", standby=True
        ).start()
        try:
            wait_until(lambda: first.serving, 60, "the first instance serving")
            publish(
                broker, topics["queries_topic"], [(q.query_id.encode(), q.event()) for q in queries]
            )
            wait_until(lambda: progress(engine)[0] >= 10, 60, "10 decisions")
            second.go()
            # the group's rebalance reaches the first instance: it finishes what it holds (if
            # it holds nothing at that instant, as on a loaded machine, the new assignment is
            # what it logs)
            wait_until(
                lambda: (
                    "rebalance takes" in first.log() or first.log().count("queries: assigned") >= 2
                ),
                60,
                "the rebalance",
            )
            stopped = time.monotonic()
            assert first.terminate(timeout=60) == 0, first.log()[-3000:]
            assert time.monotonic() - stopped < 30
            wait_until(lambda: progress(engine)[0] == len(queries), 90, "every query decided")
        finally:
            first.kill()
            second.kill()
        calls = server.calls_by_query()
    assert set(calls) == {q.query_id for q in queries}
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
