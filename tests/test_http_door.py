"""The HTTP door through the official OpenAI SDK: two HTTP-only instances (no broker at all)
on one database, a real local arm server, the real Postgres. One pair of instances for the
whole module."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime

import openai
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from door.front import Front
from door.server import Door, DoorServer
from door.shapes import body_hash
from service.events import QueryEvent
from service.log.requests import reserve
from service.pipeline import QueryRecord
from service.settings import Settings
from tests.conftest import DATABASE_URL
from tests.faults.harness import ArmServer, arm_config, build_service, make_queries

pytestmark = pytest.mark.integration

KEY = "sk-test-door"
QUERIES = make_queries(40, prefix="q-door")
ARMS = {"small": (0.1, 0.2), "big": (3.0, 6.0)}


@pytest.fixture(scope="module")
def arms() -> Iterator[ArmServer]:
    with ArmServer({q.query_id: q for q in QUERIES}, {"small": 0.6, "big": 0.9}) as server:
        yield server


@pytest.fixture(scope="module")
def schema() -> Iterator[str]:
    from service.migrate import drop_schema, upgrade

    name = f"t_{uuid.uuid4().hex[:12]}"
    upgrade(DATABASE_URL, name)
    yield name
    drop_schema(DATABASE_URL, name)


DEPS = ("kafka", "postgres")


def _instance(arms: ArmServer, schema: str, name: str, **overrides):
    fields = dict(
        database_url=DATABASE_URL,
        database_schema=schema,
        kafka_bootstrap="127.0.0.1:1",  # nothing there: an HTTP-only instance needs no broker
        kafka_consumers=False,
        http_port=0,
        api_keys=f"other-key,{KEY}",
        http_max_body_bytes=4096,
        http_timeout_seconds=20,
        metrics_port=None,
        instance_id=name,
        progress_seconds=0,
    )
    settings = Settings(**{**fields, **overrides})
    config = arm_config(arms, ARMS)
    chat = {"kind": "open", "max_output_tokens": 300, "temperature": 0.7}  # free-text answers
    config["tasks"] = {**config["tasks"], "chat": chat}
    service = build_service(settings, config)
    service.start()
    return service


@pytest.fixture(scope="module")
def services(arms: ArmServer, schema: str):
    a = _instance(arms, schema, "door-a")
    b = _instance(arms, schema, "door-b")
    yield a, b
    b.stop()
    a.stop()


@pytest.fixture(scope="module")
def engine(schema: str) -> Iterator[sa.Engine]:
    from service.storage import make_engine

    e = make_engine(DATABASE_URL, schema)
    yield e
    e.dispose()


def url(service) -> str:
    return f"http://127.0.0.1:{service.door.port}/v1"


def client(service, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url(service), api_key=key, max_retries=0)


def ask(c: openai.OpenAI, q, model: str = "", key: str | None = None, **kwargs):
    """A completion of query ``q`` (its id as the Idempotency-Key unless ``key`` is given)."""
    headers = {"Idempotency-Key": key or q.query_id}
    return c.chat.completions.with_raw_response.create(
        model=model or f"metallm/{q.task}",
        messages=[{"role": "user", "content": q.text}],
        extra_headers=headers,
        **kwargs,
    )


def rows(engine: sa.Engine, qid: str) -> list[dict]:
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT * FROM decisions WHERE query_id = :q"), {"q": qid})
        return [dict(r._mapping) for r in found]


def test_an_http_only_instance_is_ready_without_a_broker(services):
    a, _ = services
    assert a.ready() and a.queries is None
    with urllib.request.urlopen(f"http://127.0.0.1:{a.door.port}/readyz") as ready:
        assert ready.status == 200
    names = [m.id for m in client(a).models.list()]
    assert names == ["metallm", "metallm/sentiment", "metallm/yes_no", "metallm/chat"]
    # its dependencies' gauges: Postgres, used by the build; no broker
    up = {d: REGISTRY.get_sample_value("metallm_dependency_up", {"dependency": d}) for d in DEPS}
    assert up == {"kafka": None, "postgres": 1.0}


def test_the_door_sends_without_waiting_for_acks(services):
    """Every connection the door accepts has TCP_NODELAY: a response written in two parts
    (headers, body) is not held back by Nagle until the client's delayed ACK."""
    a, _ = services
    with socket.create_connection(("127.0.0.1", a.door.port)) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: door\r\n\r\n")
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        accepted = [
            c.transport.get_extra_info("socket") for c in a.door.server.server_state.connections
        ]
        assert accepted
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in accepted)


def decisions_counted(arm: str) -> float:
    samples = [
        s.value
        for metric in REGISTRY.collect()
        if metric.name == "metallm_decisions"
        for s in metric.samples
        if s.name == "metallm_decisions_total" and s.labels.get("arm") == arm
    ]
    return sum(samples)


def test_a_completion_is_routed_stored_and_answered(services, engine, arms):
    a, _ = services
    q = QUERIES[0]
    decided = sum(decisions_counted(arm) for arm in ARMS)
    raw = ask(client(a), q, max_tokens=5, temperature=0.0)
    reply = raw.parse()
    (row,) = rows(engine, q.query_id)
    # counted in the decision metrics, as a Kafka decision is (both instances share a process)
    assert sum(decisions_counted(arm) for arm in ARMS) == decided + 1
    assert reply.choices[0].message.content == row["prediction"]
    assert row["prediction"] in ("positive", "negative", "yes", "no")
    assert raw.headers["x-metallm-query-id"] == q.query_id
    assert raw.headers["x-metallm-arm"] == row["arm"]
    assert float(raw.headers["x-metallm-propensity"]) == pytest.approx(row["propensity"])
    assert reply.model_extra["metallm"]["arm"] == row["arm"]
    assert reply.model_extra["metallm"]["replayed"] is False
    assert row["instance"] == "door-a" and row["decision_seq"] is not None
    assert arms.calls_by_query()[q.query_id] == 1


def test_model_metallm_is_the_first_task_and_a_query_id_is_made(services, engine):
    a, _ = services
    q = QUERIES[1]
    reply = client(a).chat.completions.create(
        model="metallm", messages=[{"role": "user", "content": q.text}]
    )
    qid = reply.model_extra["metallm"]["query_id"]
    uuid.UUID(qid)  # made by the door
    assert rows(engine, qid)[0]["task"] == "sentiment"
    with engine.connect() as conn:  # no client can retry with it: not reserved
        held = sa.text("SELECT count(*) FROM http_requests WHERE query_id = :q")
        assert conn.execute(held, {"q": qid}).scalar() == 0


def test_a_streamed_completion(services, engine):
    a, _ = services
    q = QUERIES[2]
    stream = client(a).chat.completions.create(
        model=f"metallm/{q.task}",
        messages=[{"role": "user", "content": q.text}],
        stream=True,
        extra_headers={"Idempotency-Key": q.query_id},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == rows(engine, q.query_id)[0]["prediction"]


def test_a_retry_is_answered_from_the_stored_decision(services, engine, arms):
    a, b = services
    q = QUERIES[3]
    first = ask(client(a), q).parse()
    again = ask(client(b), q).parse()  # on the other instance
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.model_extra["metallm"]["replayed"] is True
    assert arms.calls_by_query()[q.query_id] == 1
    assert len(rows(engine, q.query_id)) == 1


def test_concurrent_retries_on_two_instances_call_once(services, engine, arms):
    a, b = services
    q = QUERIES[4]
    for arm in ARMS:
        arms.modes[arm], arms.delay[arm] = "slow", 0.8
    try:
        replies: list = []
        threads = [
            threading.Thread(target=lambda s=s: replies.append(ask(client(s), q).parse()))
            for s in (a, b)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for arm in ARMS:
            arms.modes[arm] = "ok"
    assert len(replies) == 2
    assert {r.model_extra["metallm"]["arm"] for r in replies} == {
        rows(engine, q.query_id)[0]["arm"]
    }
    assert sorted(r.model_extra["metallm"]["replayed"] for r in replies) == [False, True]
    assert arms.calls_by_query()[q.query_id] == 1


def test_the_same_id_with_another_body_is_a_conflict(services):
    a, _ = services
    q, other = QUERIES[5], QUERIES[6]
    ask(client(a), q)
    with pytest.raises(openai.ConflictError, match="another request body"):
        ask(client(a), other, key=q.query_id)


def test_feedback_is_applied_once(services, engine):
    a, b = services
    q = QUERIES[7]
    ask(client(a), q)
    body = {"query_id": q.query_id, "label": q.label}
    first = client(a).post("/feedback", body=body, cast_to=object)
    again = client(b).post("/feedback", body=body, cast_to=object)
    assert (first["status"], again["status"]) == ("applied", "duplicate")
    (row,) = rows(engine, q.query_id)
    assert row["label"] == q.label and row["reward"] is not None and row["duplicate_labels"] == 1
    shown = client(b).get(f"/decisions/{q.query_id}", cast_to=object)
    assert shown["reward"] == row["reward"] and shown["arm"] == row["arm"]
    with pytest.raises(openai.NotFoundError):
        client(b).get("/decisions/q-none", cast_to=object)
    with pytest.raises(openai.UnprocessableEntityError, match="label"):
        client(a).post("/feedback", body={"query_id": "x"}, cast_to=object)


#: the keys of ``GET /v1/decisions/{id}``, in their order: the decision's public columns
SHOWN = (
    "query_id",
    "task",
    "text",
    "options",
    "metadata",
    "sent_at",
    "decided_at",
    "arm",
    "propensity",
    "probabilities",
    "policy",
    "status",
    "prediction",
    "raw_output",
    "error",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "latency_ms",
    "attempts",
    "fallback_arm",
    "instance",
    "label",
    "correct",
    "score",
    "reward",
    "labeled_at",
    "duplicate_labels",
)
#: the keys of an answer's ``metallm`` field taken from its decision (then ``replayed``)
ROUTING = SHOWN[:1] + ("task", "arm", "propensity", "status", "prediction", "error")
ROUTING += ("fallback_arm", "attempts", "cost_usd", "latency_ms")


def test_an_answer_and_its_decision_are_shown_as_stored(services, engine):
    """The answer's ``metallm`` field, ``created`` and ``usage``, called or replayed, and
    ``GET /v1/decisions/{id}`` (timestamps as Python prints them), before and after feedback,
    are the stored row's."""
    a, b = services
    q = QUERIES[32]

    def shown() -> tuple[dict, dict]:
        got = client(b).get(f"/decisions/{q.query_id}", cast_to=object)
        (row,) = rows(engine, q.query_id)
        return got, {k: str(v) if isinstance(v, datetime) else v for k, v in row.items()}

    called = ask(client(a), q).parse()
    replayed = ask(client(b), q).parse()
    (row,) = rows(engine, q.query_id)
    for reply, again in ((called, False), (replayed, True)):
        assert reply.model_extra["metallm"] == {**{k: row[k] for k in ROUTING}, "replayed": again}
        assert reply.created == int(row["decided_at"].timestamp())
        assert reply.usage.prompt_tokens == row["input_tokens"]
        assert reply.usage.completion_tokens == row["output_tokens"]
    got, stored = shown()
    assert list(got) == list(SHOWN) and got == {k: stored[k] for k in SHOWN}
    assert (got["label"], got["labeled_at"], got["duplicate_labels"]) == (None, None, 0)
    datetime.fromisoformat(got["decided_at"])  # "2026-01-01 12:00:00.123456+00:00"
    labeled_at = "2026-01-01T12:00:00.25Z"
    body = {"query_id": q.query_id, "label": q.label, "labeled_at": labeled_at}
    assert client(a).post("/feedback", body=body, cast_to=object) == {
        "query_id": q.query_id,
        "status": "applied",
    }
    got, stored = shown()
    assert got == {k: stored[k] for k in SHOWN} and got["label"] == q.label
    assert got["labeled_at"] == "2026-01-01 12:00:00.250000+00:00"
    assert got["reward"] is not None and got["correct"] is not None


def test_a_failed_arm_call_is_a_502_and_its_decision_is_stored(services, engine, arms):
    a, _ = services
    q = QUERIES[8]
    arms.fail_ids.add(q.query_id)
    with pytest.raises(openai.APIStatusError) as failed:
        ask(client(a), q)
    assert failed.value.status_code == 502
    assert rows(engine, q.query_id)[0]["status"] == "llm_error"


def test_refusals(services):
    a, _ = services
    q = QUERIES[9]
    with pytest.raises(openai.AuthenticationError):
        ask(client(a, key="wrong"), q)
    with pytest.raises(openai.APIStatusError) as big:
        ask(client(a), q, key="big", extra_body={"metadata": {"pad": "x" * 5000}})
    assert big.value.status_code == 413
    with pytest.raises(
        openai.NotFoundError, match="metallm/sentiment, metallm/yes_no, metallm/chat"
    ):
        ask(client(a), q, model="metallm/nope")
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    with pytest.raises(openai.BadRequestError, match="unsupported fields: tools"):
        ask(client(a), q, tools=[tool])
    # checked as the Kafka path checks a query event: a value Postgres cannot store (the
    # SDK will not write NaN, Python's json will)
    body = {"model": f"metallm/{q.task}", "messages": [{"role": "user", "content": q.text}]}
    body["metadata"] = {"score": float("nan")}
    request = urllib.request.Request(
        f"{url(a)}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as nan:
        urllib.request.urlopen(request, timeout=10)
    assert nan.value.code == 400 and "NaN and Infinity" in nan.value.read().decode()


@contextlib.contextmanager
def narrow_door(service, timeout_s: float = 20) -> Iterator[tuple[Door, openai.OpenAI]]:
    """A second door on ``service``'s front that takes one request at a time, and a client of
    it that does not retry; stopped at the end."""
    front = service.door.door.front
    narrow = Door(front, service.ready, [KEY], 4096, max_in_flight=1, timeout_s=timeout_s)
    server = DoorServer(narrow, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{server.port}/v1"
    try:
        yield narrow, openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    finally:
        server.stop()


def test_a_saturated_door_says_when_to_retry(services, arms):
    a, _ = services
    arms.modes["small"] = arms.modes["big"] = "slow"
    arms.delay["small"] = arms.delay["big"] = 1.0
    try:
        with narrow_door(a) as (narrow, c):
            slow = threading.Thread(target=ask, args=(c, QUERIES[10]))
            slow.start()
            deadline = time.monotonic() + 5
            while narrow.in_flight == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as refused:
                ask(c, QUERIES[11])
            assert refused.value.response.headers["retry-after"] == "1"
            slow.join()
    finally:
        arms.modes["small"] = arms.modes["big"] = "ok"


def test_the_kafka_decider_skips_an_id_the_door_holds(services, arms):
    a, _ = services
    q = QUERIES[12]
    with a.engine.begin() as conn:
        reserve(conn, q.query_id, "some-body", "door-b", lease_s=60)
    event = QueryEvent.model_validate({"query_id": q.query_id, "text": q.text, "task": q.task})
    decided = a.decider.decide([QueryRecord(event, 0, 0)])
    assert decided.new == [] and decided.rejected[0][0] == 0
    assert "HTTP request" in decided.rejected[0][1]
    assert q.query_id not in arms.calls_by_query()


def test_a_dead_instances_reservation_is_taken_over_when_its_lease_ends(services, engine, arms):
    a, _ = services
    q = QUERIES[13]
    body = {"messages": [{"role": "user", "content": q.text}], "model": f"metallm/{q.task}"}
    with engine.begin() as conn:  # reserved by an instance that died mid-call: lease over
        reserve(conn, q.query_id, body_hash(body), "door-dead", lease_s=0)
    reply = ask(client(a), q).parse()
    assert reply.model_extra["metallm"]["replayed"] is False
    assert arms.calls_by_query()[q.query_id] == 1
    assert rows(engine, q.query_id)[0]["instance"] == "door-a"


def test_metadata_query_id_is_the_id_without_the_header(services, engine):
    a, _ = services
    q = QUERIES[14]
    reply = client(a).chat.completions.create(
        model=f"metallm/{q.task}",
        messages=[{"role": "user", "content": q.text}],
        metadata={"query_id": q.query_id, "source": "test"},
    )
    assert reply.model_extra["metallm"]["query_id"] == q.query_id
    assert rows(engine, q.query_id)[0]["metadata"] == {"source": "test"}


def test_an_open_task_answers_its_text_and_learns_a_score(services, engine):
    a, b = services
    q = QUERIES[15]
    reply = ask(client(a), q, model="metallm/chat", max_tokens=64).parse()
    (row,) = rows(engine, q.query_id)
    assert row["task"] == "chat" and reply.choices[0].message.content == row["raw_output"]
    with pytest.raises(openai.UnprocessableEntityError, match="score"):
        client(b).post("/feedback", body={"query_id": q.query_id, "score": 1.5}, cast_to=object)
    with pytest.raises(openai.UnprocessableEntityError):  # a label, and the task has no check
        client(b).post("/feedback", body={"query_id": q.query_id, "label": "x"}, cast_to=object)
    done = client(b).post("/feedback", body={"query_id": q.query_id, "score": 0.8}, cast_to=object)
    assert done["status"] == "applied"
    assert rows(engine, q.query_id)[0]["reward"] is not None
    shown = client(a).get(f"/decisions/{q.query_id}", cast_to=object)
    assert (shown["score"], shown["label"], shown["correct"]) == (0.8, None, None)


def stream_chat(service, q, **kwargs):
    """A streamed completion of ``q`` on the open task; each chunk with when it came."""
    stream = client(service).chat.completions.create(
        model="metallm/chat",
        messages=[{"role": "user", "content": q.text}],
        stream=True,
        max_tokens=64,
        extra_headers={"Idempotency-Key": q.query_id},
        **kwargs,
    )
    return [(time.time(), chunk) for chunk in stream]


def texts(got) -> list[str]:
    return [c.choices[0].delta.content for _, c in got if c.choices and c.choices[0].delta.content]


def test_an_open_answer_streams_token_by_token_and_is_stored_whole(services, engine, arms):
    a, b = services
    q = QUERIES[16]
    arms.answers[q.query_id] = "one two three four five six"
    arms.stream_delay = 0.05
    try:
        got = stream_chat(a, q)
    finally:
        arms.stream_delay = 0.0
    pieces = texts(got)
    assert len(pieces) >= 3
    first_at = next(t for t, c in got if c.choices and c.choices[0].delta.content)
    # the first token reached the client before the arm had written its last one
    assert first_at < arms.chunk_sent_at[q.query_id][-1]
    (row,) = rows(engine, q.query_id)
    assert "".join(pieces) == row["raw_output"] == "one two three four five six"
    assert (row["status"], row["output_tokens"]) == ("ok", 6) and row["input_tokens"] > 0
    last = got[-1][1]
    assert last.usage.completion_tokens == 6
    assert last.model_extra["metallm"]["arm"] == row["arm"]
    assert last.model_extra["metallm"]["replayed"] is False
    again = stream_chat(b, q)  # a retry, on the other instance: the stored answer, one chunk
    assert texts(again) == [row["raw_output"]]
    assert again[-1][1].model_extra["metallm"]["replayed"] is True
    assert arms.calls_by_query()[q.query_id] == 1


def test_an_arm_failing_mid_stream_ends_it_with_an_error_and_a_failed_decision(
    services, engine, arms
):
    a, _ = services
    q = QUERIES[17]
    arms.answers[q.query_id] = "alpha beta gamma delta"
    arms.break_ids.add(q.query_id)
    got: list[str] = []
    with pytest.raises(openai.APIError, match="the model crashed") as failed:
        stream = client(a).chat.completions.create(
            model="metallm/chat",
            messages=[{"role": "user", "content": q.text}],
            stream=True,
            extra_headers={"Idempotency-Key": q.query_id},
        )
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "alpha beta "  # the tokens sent before the arm failed
    assert failed.value.body["code"] == "llm_error"
    (row,) = rows(engine, q.query_id)
    assert row["status"] == "llm_error" and row["fallback_arm"] is None
    assert "the stream broke after its first tokens" in row["error"]
    assert arms.calls_by_query()[q.query_id] == 1


def test_a_door_streaming_its_limit_of_calls_says_when_to_retry(services, arms):
    a, _ = services
    q = QUERIES[18]
    arms.answers[q.query_id] = "slow words for a full door"
    arms.stream_delay = 0.1
    try:
        with narrow_door(a) as (_, c):
            stream = c.chat.completions.create(
                model="metallm/chat", messages=[{"role": "user", "content": q.text}], stream=True
            )
            first = next(iter(stream))  # the response began: the call goes on
            assert first.choices[0].delta.content == "slow "
            with pytest.raises(openai.RateLimitError):
                ask(c, QUERIES[19])
            words = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            assert words == "words for a full door"
    finally:
        arms.stream_delay = 0.0


def test_an_open_task_keeps_its_output_limit_and_temperature_unless_asked(services, arms):
    a, _ = services
    q, asked = QUERIES[24], QUERIES[25]
    ask(client(a), q, model="metallm/chat")
    ask(client(a), asked, model="metallm/chat", max_tokens=40, temperature=0.1)
    sent = {c.query_id: c for c in arms.calls}
    assert (sent[q.query_id].max_tokens, sent[q.query_id].temperature) == (300, 0.7)
    assert (sent[asked.query_id].max_tokens, sent[asked.query_id].temperature) == (40, 0.1)


def test_stop_waits_for_a_call_in_flight_and_stores_it(arms, schema, engine):
    before = set(threading.enumerate())
    s = _instance(arms, schema, "door-s", http_timeout_seconds=1, metrics_port=0)
    q = QUERIES[26]
    arms.delay_ids[q.query_id] = 2.5  # answered after the request's 504
    c = client(s)
    with pytest.raises(openai.APIStatusError) as late:
        ask(c, q)
    assert late.value.status_code == 504
    with pytest.raises(openai.AuthenticationError):  # an unknown path counts as "other"
        client(s, key="wrong").get(f"/nope-{uuid.uuid4().hex}", cast_to=object)
    with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_server.port}/metrics") as got:
        shown = got.read().decode()
    assert 'metallm_http_requests_total{endpoint="other",status="401"}' in shown
    assert "nope-" not in shown
    s.stop()  # waits for the call, stores its decision, then closes the arms' clients
    (row,) = rows(engine, q.query_id)
    assert row["instance"] == "door-s" and row["status"] == "ok"
    assert arms.calls_by_query()[q.query_id] == 1
    left = [t.name for t in set(threading.enumerate()) - before if t.name.startswith("metallm")]
    assert left == []


def test_a_call_outliving_its_lease_is_not_made_again_by_a_retry(services, arms, engine):
    a, _ = services
    front = Front(a.decider, a.learner, "door-short", timeout_s=1, lease_margin_s=0)
    server = DoorServer(Door(front, a.ready, [KEY], 4096, 4, timeout_s=1), "127.0.0.1", 0)
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{server.start().port}/v1", api_key=KEY)
    c = c.with_options(max_retries=0)
    q = QUERIES[27]
    arms.delay_ids[q.query_id] = 3.0  # three leases long
    try:
        with pytest.raises(openai.APIStatusError) as first:
            ask(c, q)
        time.sleep(0.5)  # the first lease (1 s) is over: only its renewal keeps it
        with pytest.raises(openai.APIStatusError) as retry:
            ask(c, q)
        assert (first.value.status_code, retry.value.status_code) == (504, 504)
        deadline = time.monotonic() + 5
        while not rows(engine, q.query_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        replayed = ask(c, q).parse()
    finally:
        server.stop()
        front.close()
    assert replayed.model_extra["metallm"]["replayed"] is True
    assert arms.calls_by_query()[q.query_id] == 1


def test_a_query_stored_first_with_another_text_is_a_conflict(services, arms):
    a, b = services
    q = QUERIES[28]
    arms.delay_ids[q.query_id] = 1.0
    result: list = []

    def door() -> None:
        try:
            result.append(ask(client(a), q).parse())
        except openai.APIStatusError as exc:
            result.append(exc)

    asking = threading.Thread(target=door)
    asking.start()
    deadline = time.monotonic() + 5
    while q.query_id not in arms.calls_by_query() and time.monotonic() < deadline:
        time.sleep(0.02)
    other = QueryEvent.model_validate(  # as the Kafka path stores it: past the reservation
        {"query_id": q.query_id, "text": "another question", "task": q.task}
    )
    decision, failed = b.decider.call_one(other)
    assert b.decider.store([decision], [q.query_id] if failed else []) == {q.query_id}
    asking.join()
    assert isinstance(result[0], openai.ConflictError)


def test_a_store_cut_off_from_postgres_is_retried_not_thrown_away(services, arms, engine):
    a, _ = services
    q = QUERIES[29]
    result: list = []
    waiting = sa.text("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    with engine.connect() as holder:  # holds the learning log's lock: the store waits for it
        holder.execute(
            sa.text(
                "SELECT pg_advisory_lock(hashtextextended('metallm-log:' || current_schema(), 0))"
            )
        )

        def door() -> None:
            try:
                result.append(ask(client(a), q).status_code)
            except openai.APIStatusError as exc:
                result.append(exc.status_code)

        asking = threading.Thread(target=door)
        asking.start()
        deadline, pids = time.monotonic() + 5, []
        while not pids and time.monotonic() < deadline:
            pids = holder.execute(waiting).scalars().all()
        for pid in pids:  # the store's connection dies under it: a transient failure
            holder.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        time.sleep(0.3)
        holder.execute(
            sa.text(
                "SELECT pg_advisory_unlock(hashtextextended('metallm-log:' || current_schema(), 0))"
            )
        )
        holder.commit()
    asking.join()
    assert pids and result == [200]
    assert rows(engine, q.query_id)[0]["instance"] == "door-a"
    assert arms.calls_by_query()[q.query_id] == 1


def test_a_thread_still_calling_after_a_504_counts_against_the_limit(services, arms):
    a, _ = services
    arms.delay_ids[QUERIES[30].query_id] = 2.0
    with narrow_door(a, timeout_s=1) as (_, c):  # its stop waits for the late call
        with pytest.raises(openai.APIStatusError) as late:
            ask(c, QUERIES[30])
        with pytest.raises(openai.RateLimitError):  # its thread still calls: none is free
            ask(c, QUERIES[31])
    assert late.value.status_code == 504
    assert QUERIES[31].query_id not in arms.calls_by_query()
