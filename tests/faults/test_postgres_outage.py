"""Postgres goes away mid-stream: the service backs off and loses, skips or repeats nothing.

1. A real Postgres server of the test's own is stopped for a few seconds (and later killed
   with ``-m immediate``, a crash) while queries and labels stream through the service.
2. Connections are cut right after COMMIT was sent (a proxy drops the reply): the server
   committed, the service saw an error and retried a batch whose work was already done.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from consumers.kafka_io import ensure_topics
from service.log import read_models
from service.migrate import upgrade
from service.pacing import BudgetPacer
from service.storage import make_engine
from tests.faults.harness import (
    ArmServer,
    PgProxy,
    arm_config,
    build_service,
    make_queries,
    missing_work,
    policy_difference,
    progress,
    publish,
    read_all,
    rebuild_policy,
    restored_policy,
    scalar,
    wait_consumed,
    wait_until,
)
from tests.helpers import committed_offset, settings_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

ARMS = {"cheap": (0.1, 0.2), "strong": (3.0, 6.0)}


def stream(bootstrap: str, topics: dict, queries, engine, step: int = 50) -> threading.Thread:
    """Publish queries in steps of ``step``, with the labels of the step before, paced by
    progress (and never waiting more than 3 s for it: Postgres may be down)."""

    def run() -> None:
        for i in range(0, len(queries), step):
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                try:
                    if progress(engine)[0] >= i - step:
                        break
                except Exception:
                    pass
                time.sleep(0.1)
            chunk = queries[i : i + step]
            publish(
                bootstrap,
                topics["queries_topic"],
                [(q.query_id.encode(), q.event()) for q in chunk],
            )
            before = queries[max(0, i - step) : i]
            publish(
                bootstrap,
                topics["labels_topic"],
                [(q.query_id.encode(), q.label_event()) for q in before],
            )
        last = queries[len(queries) - (len(queries) % step or step) :]
        publish(
            bootstrap,
            topics["labels_topic"],
            [(q.query_id.encode(), q.label_event()) for q in last],
        )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def check_exactly_once(service, engine, server, queries, broker, topics) -> None:
    n = len(queries)
    assert progress(engine) == (n, n, 0)
    # one LLM call per query: none repeated for a stored decision, none for a retried batch
    assert server.calls_by_query() == {q.query_id: 1 for q in queries}
    # every label applied once, in the live process and after a restart alike
    rebuilt = rebuild_policy(engine)
    assert service.live.policy.n_updates == n
    assert policy_difference(service.live.policy, rebuilt) <= 1e-9
    restored = restored_policy(engine)
    assert restored.live.policy.n_updates == n
    assert policy_difference(restored.live.policy, rebuilt) <= 1e-9
    # a label retried or redelivered is not counted as a duplicate (none were sent)
    with engine.connect() as conn:
        assert read_models.counters(conn).get("duplicate_labels", 0) == 0
    # nothing went to the DLQ for want of a database; every decision was published
    assert read_all(broker, topics["dlq_topic"]) == []
    published = {m.key.decode() for m in read_all(broker, topics["decisions_topic"])}
    assert published == {q.query_id for q in queries}
    assert not service.crashed.is_set()


def wait_all_done(engine, queries, broker: str, topics: dict) -> None:
    """Wait until every query is decided and rewarded and both consumers committed past every
    event; on a timeout, say what was missing in Postgres and in the committed offsets."""
    n = len(queries)

    def explain() -> str:
        offsets = {
            kind: committed_offset(broker, topics[f"{kind}_topic"], topics[f"{kind}_group"])
            for kind in ("queries", "labels")
        }
        return f"{missing_work(engine, [q.query_id for q in queries])}\ncommitted: {offsets}"

    wait_until(
        lambda: progress(engine) == (n, n, 0), 120, f"{n} rewards", interval=0.3, explain=explain
    )
    wait_consumed(broker, topics, n, n)


def test_postgres_stopped_and_crashed_mid_stream(broker, topics, private_pg, tmp_path):
    schema = f"faults_{uuid.uuid4().hex[:8]}"
    upgrade(private_pg.url, schema)
    engine = make_engine(private_pg.url, schema)
    queries = make_queries(400, prefix="q-pg")
    settings = settings_for(
        broker,
        topics,
        schema,
        private_pg.url,
        poll_max_records=25,
        labels_poll_max_records=25,
        checkpoint_every=20,
        checkpoint_min_seconds=0,  # a checkpoint may be on its way when Postgres goes
    )
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    with ArmServer({q.query_id: q for q in queries}, {"cheap": 0.6, "strong": 0.9}) as server:
        service = build_service(settings, arm_config(server, ARMS))
        service.start()
        producer = None
        try:
            producer = stream(broker, topics, queries, engine)
            wait_until(lambda: progress(engine)[0] >= 100, 60, "100 decisions")

            private_pg.stop("fast")  # sessions terminated, then connection refused
            time.sleep(4)
            assert not service.ready()  # /readyz says so
            assert all(t.is_alive() for t in service._threads)
            private_pg.start()
            wait_until(lambda: progress(engine)[0] >= 250, 60, "250 decisions")

            # crash right after a commit, when losing acknowledged work would show
            seen = progress(engine)
            wait_until(lambda: progress(engine) != seen, 60, "a commit", interval=0.005)
            private_pg.stop("immediate")  # a crash: no shutdown checkpoint, sequences jump
            time.sleep(1)
            private_pg.start()

            producer.join(timeout=120)
            wait_all_done(engine, queries, broker, topics)
            failures = service.queries.stats.failures + service.labels.stats.failures
        finally:
            if not private_pg.running():
                private_pg.start()
            service.stop()
        assert failures > 0  # it did back off
        check_exactly_once(service, engine, server, queries, broker, topics)
    engine.dispose()


def test_private_postgres_keeps_acknowledged_commits_across_a_crash(private_pg):
    """What the crash test relies on: a COMMIT the server acknowledged survives
    ``stop("immediate")``, as in a production Postgres (with ``synchronous_commit=off`` the
    last ~200 ms of acknowledged transactions were lost, and with them decisions whose Kafka
    offsets were already committed)."""
    table = f"acked_{uuid.uuid4().hex[:8]}"
    engine = make_engine(private_pg.url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} (i int PRIMARY KEY)"))
    for i in range(1, 21):  # a service's pace: a few commits a second
        with engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {table} VALUES (:i)"), {"i": i})
        time.sleep(0.02)
    engine.dispose()
    private_pg.stop("immediate")
    private_pg.start()
    engine = make_engine(private_pg.url)
    try:
        assert scalar(engine, f"SELECT count(*) FROM {table}") == 20
    finally:
        engine.dispose()


def test_the_service_warns_when_postgres_may_lose_acknowledged_commits(caplog):
    from app.application import commits_are_durable
    from tests.conftest import DATABASE_URL

    durable = make_engine(DATABASE_URL)
    lossy = make_engine(DATABASE_URL, connect_args={"options": "-csynchronous_commit=off"})
    try:
        with caplog.at_level(logging.WARNING, logger="app.application"):
            assert commits_are_durable(durable)
            assert not caplog.records
            assert not commits_are_durable(lossy)
        assert "synchronous_commit = off" in caplog.text
    finally:
        durable.dispose()
        lossy.dispose()


def test_commit_acknowledgements_lost(broker, topics, pg_schema, tmp_path):
    """The server commits, the reply is lost: the retried batch finds its decisions and rewards
    already stored. The policy must still learn each of those rewards, once, and in budget
    mode λ must still see each decision's cost, once."""
    proxy = PgProxy(cut_at=range(4, 400, 5))
    engine = make_engine(proxy.url(), pg_schema)
    queries = make_queries(300, prefix="q-ack")
    settings = settings_for(
        broker,
        topics,
        pg_schema,
        proxy.url(),
        poll_max_records=20,
        labels_poll_max_records=20,
        checkpoint_every=15,
        checkpoint_min_seconds=0,
        budget_usd_per_query=5e-5,
    )
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    with ArmServer({q.query_id: q for q in queries}, {"cheap": 0.6, "strong": 0.9}) as server:
        service = build_service(settings, arm_config(server, ARMS))
        service.start()
        try:
            stream(broker, topics, queries, engine).join(timeout=120)
            wait_all_done(engine, queries, broker, topics)
        finally:
            service.stop()
        assert proxy.cuts >= 8
        check_exactly_once(service, engine, server, queries, broker, topics)
    # λ saw every decision's cost once, in decision order, as without the faults
    with engine.connect() as conn:
        costs = conn.execute(sa.text("SELECT cost_usd FROM decisions ORDER BY decision_seq"))
        costs = list(costs.scalars())
    expected = BudgetPacer(5e-5, settings.cost_unit_usd, settings.budget_lr, settings.reward_lambda)
    for cost in costs:
        expected.observe(cost)
    pacer = service.live.pacer
    assert pacer.n_observed == len(costs) == 300
    assert abs(pacer.lam - expected.lam) <= 1e-9
    engine.dispose()
    proxy.close()
