"""Open-ended tasks end to end (issue 26 item 2), through the running service on the real broker
and Postgres with a real local arm server: the answer is the arm's text (stored capped,
``prediction`` NULL), asked with the task's own output limit; scores from Kafka become rewards
and are learnt (an early one waits for its decision); checks (contains, regex) score reference
labels; a score outside [0, 1] and a label for an open task without a check go to the DLQ with
the reason; classification beside them is unchanged."""

from __future__ import annotations

import json

import pytest

from consumers.kafka_io import ensure_topics
from service.decision import CUT_MARK, MAX_STORED_CHARS
from service.log.transaction import rewards_after
from tests.conftest import DATABASE_URL
from tests.faults.harness import (
    TASKS,
    ArmServer,
    Query,
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

OPEN_TASKS = {
    "chat": {"kind": "open", "max_output_tokens": 200, "temperature": 0.3},
    "capital": {"kind": "open", "instruction": "Answer briefly.", "check": {"kind": "contains"}},
    "math": {"kind": "open", "check": {"kind": "regex", "pattern": r"answer is (-?\d+)"}},
}
LONG = "la " * 8_000  # an answer over the stored cap


def open_query(qid: str, task: str, answer: str) -> Query:
    return Query(qid, f"[{qid}] a question for {task}", task, answer, "no idea")


def feedback(query_id: str, **fields) -> tuple[bytes, bytes]:
    return query_id.encode(), json.dumps({"query_id": query_id, **fields}).encode()


def row(engine, query_id: str) -> dict:
    (found,) = decisions(engine, f"query_id = '{query_id}'")
    return found


def test_an_open_task_end_to_end_with_scores_and_checks(broker, topics, pg_schema, engine):
    chat = open_query("q-chat", "chat", "Rain on the tin roof.")
    early = open_query("q-early", "chat", "A short poem.")
    long = open_query("q-long", "chat", LONG)
    capital = open_query("q-cap", "capital", "The capital of France is Paris.")
    math = open_query("q-math", "math", "The answer is 41. No: the answer is 42.")
    unchecked = open_query("q-unchecked", "chat", "Fine.")
    (sentiment,) = make_queries(1, prefix="q-cls")
    queries = [chat, early, long, capital, math, unchecked, sentiment]

    settings = settings_for(broker, topics, pg_schema, DATABASE_URL)
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    server = ArmServer({q.query_id: q for q in queries}, {"cheap": 1.0, "strong": 1.0}).start()
    config = arm_config(server, ARMS)
    config["tasks"] = {**TASKS, **OPEN_TASKS}
    service = build_service(settings, config)
    service.start()
    try:
        # a score before its decision waits for it; so does a label for a task without a
        # check, rejected when its decision arrives
        early_feedback = [
            feedback(early.query_id, score=0.9),
            feedback(unchecked.query_id, label="ok"),
        ]
        publish(broker, topics["labels_topic"], early_feedback)
        wait_until(lambda: progress(engine)[2] == 2, 30, "the early feedback kept")
        publish(
            broker, topics["queries_topic"], [(q.query_id.encode(), q.event()) for q in queries]
        )
        wait_until(lambda: progress(engine)[0] == 7, 60, "7 decisions")
        wait_until(lambda: progress(engine)[1:] == (1, 0), 30, "the early score applied")
        publish(
            broker,
            topics["labels_topic"],
            [
                feedback(chat.query_id, score=0.4),
                feedback(chat.query_id, score=1.0),  # a second feedback: a duplicate
                feedback(long.query_id, label="good"),  # no check: to the DLQ
                feedback(long.query_id, score=1.5),  # outside [0, 1]: to the DLQ
                feedback(capital.query_id, label="paris"),
                feedback(math.query_id, label="42"),
                feedback(sentiment.query_id, label=sentiment.label),
            ],
        )
        with_options = {"query_id": "q-opt", "text": "hi", "task": "chat", "options": ["a", "b"]}
        publish(broker, topics["queries_topic"], [(b"q-opt", json.dumps(with_options).encode())])
        wait_until(lambda: progress(engine)[1] == 5, 30, "5 rewards")
        dead = wait_until(
            lambda: len(d := read_all(broker, topics["dlq_topic"])) == 3 and d, 30, "3 dead letters"
        )
        wait_until(lambda: service.live.policy.n_updates == 5, 10, "5 updates")
    finally:
        service.stop()
        server.stop()

    # the answers: the arm's text, prediction NULL, asked with the task's limit
    assert (row(engine, chat.query_id)["raw_output"], row(engine, chat.query_id)["prediction"]) == (
        chat.label,
        None,
    )
    assert (
        row(engine, chat.query_id)["options"] == [] and row(engine, chat.query_id)["status"] == "ok"
    )
    stored = row(engine, long.query_id)["raw_output"]
    assert len(stored) == MAX_STORED_CHARS and stored.endswith(CUT_MARK)
    limits = {c.query_id: (c.max_tokens, c.temperature) for c in server.calls}
    assert limits[chat.query_id] == (200, 0.3)
    assert limits[capital.query_id] == (512, 0.0)  # the default open limit
    assert limits[sentiment.query_id] == (8, 0.0)  # classification: the arm's own
    assert row(engine, sentiment.query_id)["prediction"] == sentiment.label

    # the feedback: scores as given, checks as 1 or 0, each learnt once
    outcomes = {
        q.query_id: (row(engine, q.query_id)["score"], row(engine, q.query_id)["correct"])
        for q in (chat, early, capital, math, sentiment)
    }
    assert outcomes == {
        chat.query_id: (0.4, None),
        early.query_id: (0.9, None),
        capital.query_id: (1.0, True),
        math.query_id: (1.0, True),
        sentiment.query_id: (None, True),
    }
    chat_row = row(engine, chat.query_id)
    lam = chat_row["reward_lambda"]
    assert chat_row["reward"] == pytest.approx(0.4 - lam * chat_row["cost_usd"] / 0.001)
    assert chat_row["duplicate_labels"] == 1
    assert row(engine, long.query_id)["reward_seq"] is None
    reasons = sorted(json.loads(m.value)["reason"] for m in dead)
    assert reasons == [
        "score: Input should be less than or equal to 1",
        "task 'chat' is open-ended and has no check: send a score in [0, 1], not a label",
        "task 'chat' is open-ended: its queries take no options",
    ]
    with engine.connect() as conn:
        learnt = {r.query_id: r.correctness() for r in rewards_after(conn, 0)}
    assert learnt[chat.query_id] == 0.4 and learnt[early.query_id] == 0.9
    assert policy_difference(service.live.policy, rebuild_policy(engine)) <= 1e-9
    assert scalar(engine, "SELECT reason FROM rejected_labels") == (
        "task 'chat' is open-ended and has no check: send a score in [0, 1], not a label"
    )
    assert row(engine, unchecked.query_id)["label"] is None
    # the views count scored decisions as labeled and show their mean score
    assert scalar(engine, "SELECT sum(labeled) FROM arm_summary") == 5
    means = "SELECT min(mean_score), max(mean_score) FROM arm_summary"
    with engine.connect() as conn:
        low, high = conn.exec_driver_sql(means).one()
    assert 0.4 <= low <= high <= 1.0  # of the scores 0.4, 0.9, 1, 1 (the label has none)
