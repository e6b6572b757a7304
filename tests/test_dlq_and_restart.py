"""Bad input goes to the dead-letter topic; the policy survives restarts and crashes."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import sqlalchemy as sa

from consumers.kafka_io import ensure_topics
from service.events import MAX_TEXT_CHARS
from service.pipeline import Learner, RewardSettings
from service.storage import vector_to_bytes
from tests.conftest import DATABASE_URL, wait_for
from tests.helpers import (
    ARMS,
    build_service,
    count,
    demo_rows,
    label_bytes,
    legacy_context,
    open_learning_log,
    query_bytes,
    read_topic,
    replay_config,
    send,
    settings_for,
    write_outcomes,
)

pytestmark = pytest.mark.integration

BAD = [
    (b"{not json", "not JSON"),
    (b'{"query_id": "b1", "text": "hi"}', "task: Field required"),
    (b'{"query_id": "b2", "text": "hi", "task": "astrology"}', "unknown task 'astrology'"),
    (
        json.dumps(
            {"query_id": "b3", "text": "x" * (MAX_TEXT_CHARS + 1), "task": "sentiment"}
        ).encode(),
        "text: String should have at most",
    ),
    (b"\xff\xfe\x00", "not UTF-8"),
    (None, "empty message"),
    (b'{"query_id": "b4", "text": "hi", "task": "sentiment", "options": ["x"]}', "options"),
]


def test_malformed_events_go_to_the_dlq_and_valid_ones_around_them_are_decided(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    rows = demo_rows(21)
    config = replay_config(write_outcomes(tmp_path / "o.jsonl", rows, ARMS), list(ARMS))
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL)
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    messages = []
    for i, row in enumerate(rows):
        messages.append((row["query_id"], query_bytes(row)))
        if i % 3 == 0 and BAD:
            raw, _ = BAD[i // 3]
            messages.append((f"bad-{i}", raw))
    send(broker, topics["queries_topic"], messages)
    send(broker, topics["labels_topic"], [("x", b'{"query_id": "x"}'), ("y", b"[]")])

    service = build_service(settings, config, embedder)
    service.start()
    try:
        wait_for(lambda: count(engine, "SELECT count(*) FROM decisions") == 21, message="21")
        dead = read_topic(broker, topics["dlq_topic"], len(BAD) + 2)
    finally:
        service.stop()
    assert len(dead) == len(BAD) + 2
    by_topic: dict[str, list[dict]] = {}
    for message in dead:
        body = json.loads(message.value)
        by_topic.setdefault(body["topic"], []).append(body)
    # (over the topic's partitions: each bad event is known by its key, `bad-{i}`)
    read = read_topic(broker, topics["queries_topic"], len(messages))
    where = {(m.partition, m.offset): m.value for m in read}
    queries = by_topic[topics["queries_topic"]]
    assert len(queries) == len(BAD)
    for body in queries:
        key = base64.b64decode(body["key_b64"]).decode()
        raw, reason = BAD[int(key.removeprefix("bad-")) // 3]
        assert reason in body["reason"]
        value = None if body["value_b64"] is None else base64.b64decode(body["value_b64"])
        assert value == raw
        assert where[body["partition"], body["offset"]] == raw  # where it was read
    assert {b["reason"].split(":")[0] for b in by_topic[topics["labels_topic"]]} == {
        "label",
        "expected a JSON object, got list",
    }
    assert service.queries.stats.invalid == len(BAD)


def _learn_every_row(broker, topics, settings, config, embedder, rows):
    """Publish the rows' queries and labels, run a service until it learned them all, stop it
    (it checkpoints on shutdown); returns the stopped service."""
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    send(broker, topics["queries_topic"], [(r["query_id"], query_bytes(r)) for r in rows])
    send(
        broker,
        topics["labels_topic"],
        [(r["query_id"], label_bytes(r["query_id"], r["label"])) for r in rows],
    )
    service = build_service(settings, config, embedder)
    service.start()
    try:
        wait_for(lambda: service.live.policy.n_updates == len(rows), message="every update")
    finally:
        service.stop()
    return service


def test_restart_restores_the_policy_from_its_checkpoint(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    rows = demo_rows(40)
    config = replay_config(write_outcomes(tmp_path / "o.jsonl", rows, ARMS), list(ARMS))
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL, checkpoint_every=1000)
    # checkpoints on shutdown (the interval of 1000 was never reached)
    first = _learn_every_row(broker, topics, settings, config, embedder, rows)
    learned = first.live.policy

    second = build_service(settings, config, embedder)
    try:
        restored = second.live.policy
        assert restored.n_updates == 40
        assert second.live.watermark == first.live.watermark
        # the context builder is restored with its running statistics
        assert second.live.context.state()[0] == first.live.context.state()[0]
        assert first.live.context.length.n == 40
        contexts = np.random.default_rng(0).normal(size=(5, learned.dim))
        for x in contexts:
            assert restored.choose(config.arm_names, x).scores == pytest.approx(
                learned.choose(config.arm_names, x).scores, abs=1e-12
            )
    finally:
        second.stop()


def test_crash_after_commit_replays_rewards_recorded_after_the_checkpoint(engine, pg_schema):
    """A process that dies between storing rewards and checkpointing loses nothing."""
    rng = np.random.default_rng(1)
    params = {"alpha": 1.0, "epsilon": 0.05, "seed": 0}
    with engine.begin() as conn:
        for i in range(30):
            conn.execute(
                sa.text(
                    "INSERT INTO decisions (query_id, task, text, options, arm, propensity, "
                    "probabilities, "
                    "policy, status, prediction, cost_usd, embedding_model, context) "
                    "VALUES (:q, 's', 't', '[\"a\", \"b\"]', :arm, 0.5, '{}', 'linucb', 'ok', "
                    "'a', :cost, 'm', :ctx)"
                ),
                {
                    "q": f"q{i}",
                    "arm": "cheap" if i % 2 else "strong",
                    "cost": 0.001 * (i % 3),
                    "ctx": vector_to_bytes(rng.normal(size=8)),
                },
            )
    learning_log = open_learning_log(
        engine, "linucb", params, checkpoint_every=10, context=legacy_context()
    )
    live = learning_log.live
    learner = Learner(learning_log, RewardSettings(0.1, 0.001), pending_ttl_seconds=60)
    from service.events import LabelEvent

    labels = [LabelEvent(query_id=f"q{i}", label="a" if i % 4 else "b") for i in range(20)]
    learner.learn(labels[:12])  # 12 ≥ 10: checkpointed after this batch
    learner.learn(labels[12:])  # 8 more rewards committed, not checkpointed
    assert live.policy.n_updates == 20
    # "crash": this process's memory is gone; a new one restores checkpoint + later rewards
    recovering = open_learning_log(
        engine, "linucb", params, checkpoint_every=10, context=legacy_context()
    )
    assert recovering.restore() == 8
    recovered = recovering.live
    assert recovered.policy.n_updates == 20
    assert recovered.watermark == live.watermark
    x = rng.normal(size=8)
    assert recovered.policy.choose(["cheap", "strong"], x).scores == pytest.approx(
        live.policy.choose(["cheap", "strong"], x).scores, abs=1e-12
    )


def _config_with_features(outcomes, features: dict[str, str]):
    from service.config import parse_config
    from tests.helpers import TASKS

    tasks = {name: {**task, "features": features} for name, task in TASKS.items()}
    arms = [{"name": a, "provider": "replay", "model": a, "outcomes": str(outcomes)} for a in ARMS]
    return parse_config({"tasks": tasks, "arms": arms})


def test_declared_metadata_feeds_the_context_and_a_bad_value_goes_to_the_dlq(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    rows = demo_rows(6)
    outcomes = write_outcomes(tmp_path / "o.jsonl", rows, ARMS)
    config = _config_with_features(outcomes, {"level": "numeric", "source": "categorical"})
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL)
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    messages = []
    for i, row in enumerate(rows):
        event = {k: row[k] for k in ("query_id", "text", "task")}
        event["metadata"] = {"level": i, "source": "web"} if i != 3 else {"level": "hard"}
        messages.append((row["query_id"], json.dumps(event).encode()))
    send(broker, topics["queries_topic"], messages)

    service = build_service(settings, config, embedder)
    service.start()
    try:
        wait_for(lambda: count(engine, "SELECT count(*) FROM decisions") == 5, message="5")
        [dead] = read_topic(broker, topics["dlq_topic"], 1)
    finally:
        service.stop()
    body = json.loads(dead.value)
    assert "metadata.level is declared numeric but is 'hard'" in body["reason"]
    assert json.loads(base64.b64decode(body["value_b64"]))["query_id"] == rows[3]["query_id"]
    with engine.connect() as conn:
        layouts = conn.execute(sa.text("SELECT DISTINCT context_layout FROM decisions")).all()
    [(layout,)] = layouts
    assert "level:numeric" in layout and "source:categorical/" in layout
    assert service.live.context.numeric["level"].n == 5  # every stored decision observed


def test_a_policy_learned_on_another_context_layout_stops_the_start(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    from service.learning import ContextMismatch

    rows = demo_rows(12)
    config = replay_config(write_outcomes(tmp_path / "o.jsonl", rows, ARMS), list(ARMS))
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL)
    first = _learn_every_row(broker, topics, settings, config, embedder, rows)
    spec = first.live.context.spec

    other = "none" if settings.context_embedding != "none" else "raw"
    changed = settings.model_copy(update={"context_embedding": other})
    with pytest.raises(ContextMismatch) as error:
        build_service(changed, config, embedder)
    message = str(error.value)
    assert repr(spec) in message and f"emb:{other}" in message
    assert "METALLM_CONTEXT_EMBEDDING" in message
    # the same layout starts, and keeps the builder's statistics
    again = build_service(settings, config, embedder)
    try:
        assert again.live.context.length.n == 12
    finally:
        again.stop()
