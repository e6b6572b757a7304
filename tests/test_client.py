"""Answers back on the Kafka path: ``producers.client.Client`` and ``metallm ask`` against the
real service (in this process), the real broker and Postgres, and a real local arm server.

One service serves the whole module; each test asks with ids of its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.kafka_io import delete_topics
from producers.client import AnswerTimeout, Client, QueryRejected, Topics
from service.settings import isolated_stream_names
from tests.conftest import DATABASE_URL
from tests.faults.harness import (
    TASKS,
    ArmServer,
    arm_config,
    build_service,
    make_queries,
    service_env,
    write_config,
)
from tests.helpers import metallm_cli, settings_for

pytestmark = pytest.mark.integration

QUERIES = make_queries(40, prefix="q-ask")
ARMS = {"small": (0.1, 0.2)}


@pytest.fixture(scope="module")
def schema() -> Iterator[str]:
    from service.migrate import drop_schema, upgrade

    name = f"t_{uuid.uuid4().hex[:12]}"
    upgrade(DATABASE_URL, name)
    yield name
    drop_schema(DATABASE_URL, name)


@pytest.fixture(scope="module")
def streams(broker: str) -> Iterator[dict[str, str]]:
    names = isolated_stream_names(f"t-{uuid.uuid4().hex[:10]}")
    yield names
    delete_topics(broker, [t for k, t in names.items() if k.endswith("_topic")])


@pytest.fixture(scope="module")
def arms() -> Iterator[ArmServer]:
    with ArmServer({q.query_id: q for q in QUERIES}, {"small": 1.0}) as server:
        yield server


@pytest.fixture(scope="module")
def config_document(arms: ArmServer) -> dict:
    return arm_config(arms, ARMS)


@pytest.fixture(scope="module")
def service(broker, streams, schema, config_document) -> Iterator[object]:
    settings = settings_for(broker, streams, schema, DATABASE_URL, poll_max_records=16)
    app = build_service(settings, config_document)
    app.start()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def client(broker, streams, service) -> Iterator[Client]:
    topics = Topics(streams["queries_topic"], streams["decisions_topic"], streams["dlq_topic"])
    with Client(broker, topics) as c:
        yield c


def test_ask_returns_the_arms_answer(client: Client) -> None:
    q = QUERIES[0]
    answer = client.ask(q.text, q.task, query_id=q.query_id, timeout=30)
    assert (answer.query_id, answer.task, answer.arm) == (q.query_id, q.task, "small")
    assert answer.ok and answer.error is None
    assert answer.prediction == q.label and answer.answer == q.label  # what the arm returned
    assert answer.cost_usd > 0 and answer.latency_ms is not None and answer.propensity == 1.0


def test_many_asks_in_flight_each_get_their_own_answer(client: Client) -> None:
    batch = QUERIES[1:25]
    futures = {q.query_id: client.submit(q.text, q.task, q.query_id, timeout=30) for q in batch}
    answers = {qid: f.result() for qid, f in futures.items()}
    assert {qid: a.prediction for qid, a in answers.items()} == {q.query_id: q.label for q in batch}


def test_an_arm_that_fails_gives_its_error(client: Client, arms: ArmServer) -> None:
    q = QUERIES[25]
    arms.fail_ids.add(q.query_id)  # HTTP 500 for this query
    answer = client.ask(q.text, q.task, query_id=q.query_id, timeout=30)
    assert answer.status == "llm_error" and not answer.ok
    assert answer.prediction is None and answer.answer is None
    assert "HTTP 500" in (answer.error or "")


def test_a_rejected_query_raises_the_dead_letter_reason(client: Client) -> None:
    with pytest.raises(QueryRejected, match="unknown task") as caught:
        client.ask("[q-ask-x] what?", "no_such_task", query_id="q-ask-x", timeout=30)
    assert caught.value.query_id == "q-ask-x"
    # an id taken by another query is rejected too: an ask never gets another query's answer
    q = QUERIES[0]
    with pytest.raises(QueryRejected, match="taken by another query"):
        client.ask(f"{q.text} (changed)", q.task, query_id=q.query_id, timeout=30)


def test_no_service_times_out_naming_the_query(broker: str) -> None:
    names = isolated_stream_names(f"t-{uuid.uuid4().hex[:10]}")
    topics = Topics(names["queries_topic"], names["decisions_topic"], names["dlq_topic"], 1)
    try:
        with (
            Client(broker, topics) as lonely,
            pytest.raises(AnswerTimeout, match="'q-ask-nobody'") as caught,
        ):
            lonely.ask("anyone?", "sentiment", query_id="q-ask-nobody", timeout=0.5)
        assert isinstance(caught.value, TimeoutError) and caught.value.query_id == "q-ask-nobody"
    finally:
        delete_topics(broker, [topics.queries, topics.decisions, topics.dlq])


def test_metallm_ask_prints_the_answer(
    broker, streams, schema, config_document, service, tmp_path: Path
) -> None:
    q = QUERIES[30]
    config = write_config(tmp_path / "metallm.yaml", config_document)
    env = service_env(broker, streams, DATABASE_URL, schema, config)
    done = metallm_cli(
        schema,
        "ask",
        q.text,
        "--task",
        q.task,
        "--query-id",
        q.query_id,
        "--timeout",
        "30",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == q.label
    assert f"query {q.query_id} · arm small · ok" in done.stderr


def test_metallm_ask_tells_an_unknown_task_before_sending(
    config_document, tmp_path: Path, monkeypatch, capsys
) -> None:
    from app.cli import main

    config = write_config(tmp_path / "metallm.yaml", config_document)
    monkeypatch.setenv("METALLM_CONFIG", str(config))
    monkeypatch.setenv("METALLM_KAFKA_BOOTSTRAP", "127.0.0.1:9")  # nothing is sent
    assert main(["ask", "hello", "--task", "nope"]) == 2
    expected = f"metallm: unknown task 'nope': the config has {', '.join(TASKS)}"
    assert capsys.readouterr().err.strip() == expected
