"""Kafka and HTTP instances on one database learn one policy (issue 26): one instance serving
the Kafka topics (consumers, no door) and one HTTP-only door (no broker) on one schema, queries
through both, labels and scores through both (each path's feedback for the other's decisions
too, one open answer streamed), then each instance's policy equals the policy rebuilt from the
reward log, to 1e-9."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from consumers.kafka_io import ensure_topics
from service.settings import Settings
from tests.conftest import DATABASE_URL
from tests.faults.harness import (
    TASKS,
    ArmServer,
    Query,
    arm_config,
    build_service,
    make_queries,
    policy_difference,
    progress,
    publish,
    rebuild_policy,
    wait_until,
)
from tests.faults.test_postgres_outage import ARMS
from tests.helpers import settings_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

KEY = "sk-one-policy"


def open_query(qid: str, answer: str) -> Query:
    return Query(qid, f"[{qid}] write something", "chat", answer, "no idea")


def ask(c: openai.OpenAI, q: Query) -> None:
    """A query through the door: the open one streamed, the others not."""
    kwargs = {
        "model": f"metallm/{q.task}",
        "messages": [{"role": "user", "content": q.text}],
        "extra_headers": {"Idempotency-Key": q.query_id},
    }
    if q.task == "chat":
        text = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in c.chat.completions.create(stream=True, **kwargs)
            if chunk.choices
        )
        assert text == q.label
    else:
        c.chat.completions.create(**kwargs)


def feedback(q: Query) -> dict:
    """An open query's score, another's label."""
    return {"query_id": q.query_id, **({"score": 0.7} if q.task == "chat" else {"label": q.label})}


def test_kafka_and_http_instances_on_one_database_learn_one_policy(
    broker, topics, pg_schema, engine
):
    by_kafka = [*make_queries(12, prefix="q-kafka"), open_query("q-kafka-chat", "Some words.")]
    by_http = [*make_queries(12, prefix="q-http", seed=1), open_query("q-http-chat", "A b c.")]
    queries = by_kafka + by_http
    server = ArmServer({q.query_id: q for q in queries}, {"cheap": 0.6, "strong": 0.9}).start()
    config = arm_config(server, ARMS)
    config["tasks"] = {**TASKS, "chat": {"kind": "open"}}
    kafka_settings = settings_for(broker, topics, pg_schema, DATABASE_URL, instance_id="kafka")
    ensure_topics(kafka_settings, [topics["queries_topic"], topics["labels_topic"]])
    http_settings = Settings(
        database_url=DATABASE_URL,
        database_schema=pg_schema,
        kafka_bootstrap="127.0.0.1:1",  # nothing there: the door needs no broker
        kafka_consumers=False,
        http_port=0,
        api_keys=KEY,
        metrics_port=None,
        instance_id="http",
        progress_seconds=0,
    )
    kafka, http = build_service(kafka_settings, config), build_service(http_settings, config)
    kafka.start()
    http.start()
    door = openai.OpenAI(
        base_url=f"http://127.0.0.1:{http.door.port}/v1", api_key=KEY, max_retries=0
    )
    try:
        publish(
            broker, topics["queries_topic"], [(q.query_id.encode(), q.event()) for q in by_kafka]
        )
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda q: ask(door, q), by_http))
        wait_until(lambda: progress(engine)[0] == len(queries), 60, "every decision")
        # feedback crosses: every other query of each path gets its label through the other
        through_http = by_kafka[::2] + by_http[1::2]
        through_kafka = [q for q in queries if q not in through_http]
        labels = [(q.query_id.encode(), json.dumps(feedback(q)).encode()) for q in through_kafka]
        publish(broker, topics["labels_topic"], labels)
        for q in through_http:
            applied = door.post("/feedback", body=feedback(q), cast_to=object)
            assert applied["status"] == "applied"
        wait_until(lambda: progress(engine)[1] == len(queries), 60, "every reward")
        for service in (kafka, http):
            wait_until(
                lambda s=service: s.live.policy.n_updates == len(queries), 30, "followed the log"
            )
    finally:
        http.stop()
        kafka.stop()
        server.stop()
    with engine.connect() as conn:
        found = conn.exec_driver_sql("SELECT instance, count(*) FROM decisions GROUP BY 1")
        assert dict(found.all()) == {"kafka": len(by_kafka), "http": len(by_http)}
    rebuilt = rebuild_policy(engine)
    assert rebuilt.n_updates == len(queries)
    assert policy_difference(kafka.live.policy, rebuilt) <= 1e-9
    assert policy_difference(http.live.policy, rebuilt) <= 1e-9
    assert server.calls_by_query() == {q.query_id: 1 for q in queries}
