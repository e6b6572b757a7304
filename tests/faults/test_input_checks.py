"""Bad input rejected where it enters (issue 25), through the running service on the real broker
and Postgres: a label outside its query's label set (after and before its decision), a query id
reused by another query (within one batch and across batches), a text longer than an arm's
context window, and a call refused for length (``input_too_long``) never learnt from."""

from __future__ import annotations

import base64
import json

import pytest

from consumers.kafka_io import ensure_topics
from service.config import parse_config
from service.events import InvalidEvent
from service.log import read_models
from service.query_checks import fits
from service.tasks import build_prompt
from tests.conftest import DATABASE_URL
from tests.faults.harness import (
    ArmServer,
    arm_config,
    build_service,
    decisions,
    make_queries,
    policy_difference,
    progress,
    publish,
    read_all,
    rebuild_policy,
    scalar,
    wait_until,
)
from tests.faults.test_postgres_outage import ARMS
from tests.helpers import settings_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def dead_letters(broker: str, topics: dict) -> list[dict]:
    return [json.loads(m.value) for m in read_all(broker, topics["dlq_topic"])]


def published(broker: str, topics: dict) -> list[str]:
    """The query ids of the decision events published, in order."""
    return [json.loads(m.value)["query_id"] for m in read_all(broker, topics["decisions_topic"])]


def row(engine, query_id: str) -> dict:
    (found,) = decisions(engine, f"query_id = '{query_id}'")
    return found


def start_service(broker, topics, pg_schema, server, **arm_overrides):
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL)
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    service = build_service(settings, arm_config(server, ARMS, **arm_overrides))
    service.start()
    return service


def sent_text(dead: dict) -> str:
    return json.loads(base64.b64decode(dead["value_b64"]))["text"]


def test_a_label_outside_the_label_set_is_rejected_before_and_after_its_decision(
    broker, topics, pg_schema, engine
):
    early, late = make_queries(2, prefix="q-set")

    def labels(*pairs) -> list[tuple[int, int]]:
        messages = [(q.query_id.encode(), q.label_event(label)) for q, label in pairs]
        return publish(broker, topics["labels_topic"], messages)

    with ArmServer({q.query_id: q for q in (early, late)}, {"cheap": 1.0, "strong": 1.0}) as server:
        service = start_service(broker, topics, pg_schema, server)
        try:
            # before its decision: kept, then rejected when the decision arrives
            [(partition, offset)] = labels((early, "banana"))
            wait_until(lambda: progress(engine)[2] == 1, 30, "the early label kept")
            publish(
                broker,
                topics["queries_topic"],
                [(q.query_id.encode(), q.event()) for q in (early, late)],
            )
            wait_until(lambda: progress(engine)[0] == 2, 30, "2 decisions")
            wait_until(lambda: progress(engine)[2] == 0, 30, "the early label taken")
            # after its decision: to the DLQ with the reason
            labels((late, "banana"))
            wait_until(lambda: len(dead_letters(broker, topics)) == 1, 30, "a dead letter")
            assert progress(engine)[1] == 0  # neither bad label was applied
            # a right label after a rejected one is applied, once
            labels((early, early.label), (late, late.label))
            wait_until(lambda: progress(engine)[1] == 2, 30, "the 2 right labels")
            wait_until(lambda: service.live.policy.n_updates == 2, 10, "2 updates")
        finally:
            service.stop()

    (dead,) = dead_letters(broker, topics)
    assert dead["topic"] == topics["labels_topic"]
    assert dead["reason"].startswith("label 'banana' is not one of the query's labels: ")
    with engine.connect() as conn:
        rejected = [dict(r._mapping) for r in conn.exec_driver_sql("SELECT * FROM rejected_labels")]
        counters = read_models.counters(conn)
    assert [(r["query_id"], r["label"]) for r in rejected] == [(early.query_id, "banana")]
    assert (rejected[0]["topic"], rejected[0]["partition"], rejected[0]["kafka_offset"]) == (
        topics["labels_topic"],
        partition,
        offset,
    )
    assert counters["labels_rejected"] == 2
    for q in (early, late):
        assert row(engine, q.query_id)["label"] == q.label
        assert row(engine, q.query_id)["duplicate_labels"] == 0  # a rejected label is no label
    assert policy_difference(service.live.policy, rebuild_policy(engine)) <= 1e-9


def test_a_redelivered_bad_label_changes_nothing(engine):
    """Kafka redelivers a rejected label (a crash before the offset commit): it goes to the DLQ
    again (its first dead letter may not have reached the broker) but is not counted again."""
    from service.events import LabelEvent
    from service.pipeline import Learner
    from service.reward import RewardSettings
    from tests.helpers import legacy_context, open_learning_log
    from tests.test_labels import insert_decision

    learning_log = open_learning_log(engine, "linucb", {"seed": 0}, context=legacy_context())
    learner = Learner(learning_log, RewardSettings(0.1, 0.001), 60)
    insert_decision(engine, "r1")
    batch = [LabelEvent(query_id="r1", label="banana")]
    where = [("labels", 0, 10)]
    assert [i for i, _ in learner.learn(batch, where, "g").rejected] == [0]
    assert [i for i, _ in learner.learn(batch, where, "g").rejected] == [0]
    with engine.connect() as conn:
        assert read_models.counters(conn)["labels_rejected"] == 1
    assert scalar(engine, "SELECT label FROM decisions WHERE query_id = 'r1'") is None
    assert learning_log.live.policy.n_updates == 0


def test_a_reused_query_id_is_republished_when_the_same_and_rejected_when_not(
    broker, topics, pg_schema, engine
):
    a, b = make_queries(2, prefix="q-reuse")

    def other(q) -> bytes:  # the same id for another text
        body = {"query_id": q.query_id, "text": f"[{q.query_id}] no", "task": q.task}
        return json.dumps(body).encode()

    def send(*events) -> None:
        publish(broker, topics["queries_topic"], [(e[0].query_id.encode(), e[1]) for e in events])

    with ArmServer({q.query_id: q for q in (a, b)}, {"cheap": 1.0, "strong": 1.0}) as server:
        service = start_service(broker, topics, pg_schema, server)
        try:
            # within one batch: a twice (the same), b then b with another text
            send((a, a.event()), (a, a.event()), (b, b.event()), (b, other(b)))
            wait_until(lambda: len(published(broker, topics)) == 3, 30, "3 decision events")
            wait_until(lambda: len(dead_letters(broker, topics)) == 1, 30, "a dead letter")
            # across batches: a again (the same), then a with another text
            send((a, a.event()))
            wait_until(lambda: len(published(broker, topics)) == 4, 30, "a republished")
            send((a, other(a)))
            wait_until(lambda: len(dead_letters(broker, topics)) == 2, 30, "2 dead letters")
        finally:
            service.stop()

    assert sorted(published(broker, topics)) == sorted([a.query_id] * 3 + [b.query_id])
    taken = "is taken by another query (a different text)"
    reasons = sorted((d["reason"], sent_text(d)) for d in dead_letters(broker, topics))
    assert reasons == [
        (f"query id {a.query_id!r} {taken}", f"[{a.query_id}] no"),
        (f"query id {b.query_id!r} {taken}", f"[{b.query_id}] no"),
    ]
    assert row(engine, b.query_id)["text"] == b.text and row(engine, a.query_id)["text"] == a.text
    assert server.calls_by_query() == {a.query_id: 1, b.query_id: 1}  # one call per query


def test_within_one_batch_a_repeated_id_is_republished_or_rejected(
    broker, topics, pg_schema, engine
):
    """The same as above, handed to the decider as one batch (the broker may split a batch)."""
    from service.events import QueryEvent
    from service.pipeline import QueryRecord

    (a,) = make_queries(1, prefix="q-batch")
    first = QueryEvent.from_bytes(a.event())
    again = QueryEvent.from_bytes(a.event())
    changed = first.model_copy(update={"metadata": {"lang": "en"}})
    with ArmServer({a.query_id: a}, {"cheap": 1.0, "strong": 1.0}) as server:
        settings = settings_for(broker, topics, pg_schema, DATABASE_URL)
        service = build_service(settings, arm_config(server, ARMS))
        try:
            decided = service.decider.decide(
                [QueryRecord(first), QueryRecord(changed), QueryRecord(again)]
            )
        finally:
            service.stop()
    assert [e.query_id for e in decided.new] == [a.query_id]
    assert decided.again == decided.new  # the repeat gets the same decision
    assert decided.rejected == [
        (1, f"query id {a.query_id!r} is taken by another query (a different metadata)")
    ]
    assert server.calls_by_query() == {a.query_id: 1}


def test_a_text_too_long_for_an_arm_is_not_offered_to_it(broker, topics, pg_schema, engine):
    short, long, huge = make_queries(3, prefix="q-long")
    texts = {short: short.text, long: long.text + " x" * 1500, huge: huge.text + " x" * 6000}
    windows = {"cheap": {"context_tokens": 400}, "strong": {"context_tokens": 2000}}
    events = [
        (q.query_id.encode(), json.dumps({"query_id": q.query_id, "text": t, "task": q.task}))
        for q, t in texts.items()
    ]
    with ArmServer({q.query_id: q for q in texts}, {"cheap": 1.0, "strong": 1.0}) as server:
        service = start_service(broker, topics, pg_schema, server, **windows)
        try:
            publish(broker, topics["queries_topic"], [(k, v.encode()) for k, v in events])
            wait_until(lambda: progress(engine)[0] == 2, 30, "2 decisions")
            wait_until(lambda: len(dead_letters(broker, topics)) == 1, 30, "a dead letter")
        finally:
            service.stop()
    assert set(row(engine, short.query_id)["probabilities"]) == {"cheap", "strong"}
    decided_long = row(engine, long.query_id)
    assert decided_long["arm"] == "strong" and decided_long["propensity"] == 1.0
    assert decided_long["probabilities"] == {"strong": 1.0}  # the draw made: one arm offered
    (dead,) = dead_letters(broker, topics)
    assert dead["reason"].startswith("text too long: its prompt is ~")
    assert "the largest: 2000 tokens" in dead["reason"]
    assert huge.query_id not in server.calls_by_query()


def test_a_call_refused_for_length_is_not_learnt_from(broker, topics, pg_schema, engine):
    (q,) = make_queries(1, prefix="q-refused")
    with ArmServer({q.query_id: q}, {"cheap": 1.0, "strong": 1.0}) as server:
        server.modes = {"cheap": "too_long", "strong": "too_long"}
        service = start_service(broker, topics, pg_schema, server)
        try:
            publish(broker, topics["queries_topic"], [(q.query_id.encode(), q.event())])
            wait_until(lambda: progress(engine)[0] == 1, 30, "the decision")
            publish(broker, topics["labels_topic"], [(q.query_id.encode(), q.label_event())])
            wait_until(lambda: row(engine, q.query_id)["label"] is not None, 30, "its label")
        finally:
            service.stop()
    found = row(engine, q.query_id)
    assert found["status"] == "input_too_long" and found["fallback_arm"] is None
    assert found["reward"] is None and found["reward_seq"] is None and found["cost_usd"] == 0.0
    assert found["attempts"] == 1  # not retried
    assert service.live.policy.n_updates == 0


def test_with_truncate_a_text_that_fits_no_arm_is_cut_to_fit_the_largest(
    broker, topics, pg_schema, engine
):
    (q,) = make_queries(1, prefix="q-cut")
    raw = json.dumps({"query_id": q.query_id, "text": q.text + " x" * 6000, "task": q.task})
    windows = {"cheap": {"context_tokens": 400}, "strong": {"context_tokens": 2000}}
    with ArmServer({q.query_id: q}, {"cheap": 1.0, "strong": 1.0}) as server:
        config = arm_config(server, ARMS, **windows)
        by_setting = {}
        for setting in ("dlq", "truncate"):
            settings = settings_for(broker, topics, pg_schema, DATABASE_URL, too_long_text=setting)
            service = build_service(settings, config)
            try:
                by_setting[setting] = service.decider.validate(raw.encode())
            except InvalidEvent as exc:
                by_setting[setting] = exc
            finally:
                service.stop()
    assert str(by_setting["dlq"]).startswith("text too long: ")
    cut = by_setting["truncate"]
    assert q.text + " x" * 100 in cut.text  # the start is kept, the end is dropped
    parsed = parse_config(config)
    prompt = build_prompt(parsed.tasks[q.task], cut.text, parsed.tasks[q.task].labels).text
    assert fits(parsed.arm("strong"), prompt) and not fits(parsed.arm("cheap"), prompt)
