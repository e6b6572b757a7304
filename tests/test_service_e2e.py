"""End to end on the real broker and the real Postgres: queries → decisions, labels → rewards."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pytest
import sqlalchemy as sa
from threadpoolctl import threadpool_limits

from app.application import Application, SchemaMissing
from consumers.kafka_io import ensure_topics
from service import storage
from service.llm.gateway import Gateway
from service.log import checkpoints
from service.settings import Settings
from tests.conftest import DATABASE_URL, wait_for
from tests.helpers import (
    ARMS,
    TASKS,
    CountingReplay,
    arm_with_an_unset_key,
    build_service,
    committed_offset,
    count,
    demo_rows,
    label_bytes,
    query_bytes,
    read_topic,
    record_closes,
    replay_config,
    send,
    settings_for,
    write_outcomes,
)

pytestmark = pytest.mark.integration


def test_stream_of_queries_and_late_early_duplicate_unknown_labels(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    rows = demo_rows(200)
    outcomes = write_outcomes(tmp_path / "outcomes.jsonl", rows, ARMS)
    config = replay_config(outcomes, list(ARMS))
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL, checkpoint_every=50)
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])

    early = rows[:30]  # labels published before their queries
    twice = rows[50:70]  # labels published twice
    unknown = [(f"never-{i}", "yes") for i in range(10)]
    send(
        broker,
        topics["labels_topic"],
        [(r["query_id"], label_bytes(r["query_id"], r["label"])) for r in early],
    )

    CountingReplay.calls = 0
    service = build_service(settings, config, embedder)
    before = service.live.policy.dumps()
    service.start()
    try:
        send(broker, topics["queries_topic"], [(r["query_id"], query_bytes(r)) for r in rows])
        wait_for(
            lambda: count(engine, "SELECT count(*) FROM decisions") == 200, message="200 decisions"
        )
        late = [(r["query_id"], label_bytes(r["query_id"], r["label"])) for r in rows[30:]]
        late += [(r["query_id"], label_bytes(r["query_id"], r["label"])) for r in twice]
        late += [(qid, label_bytes(qid, label)) for qid, label in unknown]
        send(broker, topics["labels_topic"], late)
        wait_for(
            lambda: (
                count(engine, "SELECT count(*) FROM decisions WHERE reward_seq IS NOT NULL") == 200
            ),
            message="200 rewards",
        )
        wait_for(
            lambda: count(engine, "SELECT count(*) FROM pending_labels") == 10,
            message="10 pending unknown labels",
        )
        wait_for(
            lambda: count(engine, "SELECT coalesce(sum(duplicate_labels), 0) FROM decisions") == 20,
            message="20 duplicates counted",
        )
        wait_for(
            lambda: metric(metrics_text(service), "metallm_pending_labels") == 10,
            message="the pending-labels gauge",
        )
        scrape = metrics_text(service)
        assert http_status(service, "/healthz") == 200
        assert http_status(service, "/readyz") == 200
    finally:
        service.stop()

    # exactly one decision per query, every label applied exactly once, rewards stored
    assert count(engine, "SELECT count(DISTINCT query_id) FROM decisions") == 200
    assert CountingReplay.calls == 200
    assert count(engine, "SELECT count(DISTINCT reward_seq) FROM decisions") == 200
    with engine.connect() as conn:
        bad = conn.execute(
            sa.text(
                "SELECT count(*) FROM decisions WHERE label IS NULL OR reward IS NULL "
                "OR correct IS NULL OR reward_applied_at IS NULL"
            )
        ).scalar_one()
        assert bad == 0
        # reward = 1[correct] - λ·cost/unit, stored per row
        for correct, reward, cost, lam in conn.execute(
            sa.text("SELECT correct, reward, cost_usd, reward_lambda FROM decisions")
        ):
            assert reward == pytest.approx(float(correct) - lam * cost / settings.cost_unit_usd)
        labels = {r["query_id"]: r["label"] for r in rows}
        for qid, label, prediction, correct in conn.execute(
            sa.text("SELECT query_id, label, prediction, correct FROM decisions")
        ):
            assert label == labels[qid]
            assert correct == (prediction == label)
        pending = {r[0] for r in conn.execute(sa.text("SELECT query_id FROM pending_labels"))}
        assert pending == {qid for qid, _ in unknown}
        props = conn.execute(
            sa.text("SELECT min(propensity), max(propensity) FROM decisions")
        ).one()
        assert 0 < props[0] <= props[1] <= 1
        # the default policy priced every choice at the configured λ; the chosen arm's cost
        # is estimated once calls of it are in the log (replay arms have no prices in the
        # config: their estimates are their recorded costs), here for the second hundred
        priced = conn.execute(
            sa.text("SELECT DISTINCT policy, decision_lambda FROM decisions")
        ).all()
        assert priced == [("correctness_ucb", settings.reward_lambda)]
        estimated = conn.execute(
            sa.text(
                "SELECT count(estimated_cost_usd) FROM decisions "
                "WHERE decision_seq > (SELECT min(decision_seq) + 99 FROM decisions)"
            )
        ).scalar_one()
        assert estimated == 100
        checkpoint = checkpoints.latest_checkpoint(conn)

    # the policy learned from every label, and was checkpointed
    assert service.live.policy.n_updates == 200
    assert service.live.policy.dumps() != before
    assert checkpoint is not None and checkpoint.n_updates == 200

    # offsets committed after the database commit, decision events published
    assert committed_offset(broker, topics["queries_topic"], topics["queries_group"]) == 200
    assert (
        committed_offset(broker, topics["labels_topic"], topics["labels_group"])
        == 30 + 170 + 20 + 10
    )
    # the same story in the Prometheus metrics (process-wide counters, so compare by arm sums)
    by_arm = {
        arm: count(engine, f"SELECT count(*) FROM decisions WHERE arm = '{arm}'") for arm in ARMS
    }
    for arm, n in by_arm.items():
        assert metric(scrape, "metallm_decisions_total", arm=arm, status="ok") >= n
        assert metric(scrape, "metallm_reward_count", arm=arm) >= n
    assert metric(scrape, "metallm_consumer_lag", topic=topics["queries_topic"], partition="0") == 0

    events = read_topic(broker, topics["decisions_topic"], 200)
    assert sorted(json.loads(m.value)["query_id"] for m in events) == sorted(labels)
    bodies = [json.loads(m.value) for m in events]
    assert all(b["attempts"] == 1 and "fallback_arm" not in b for b in bodies)  # none failed
    assert all(b["arm"] in ARMS and b["status"] == "ok" for b in bodies)


def blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")


def test_a_build_that_fails_leaves_blas_and_postgres_as_they_were(tmp_path, embedder):
    """No schema yet: build says to migrate, and gives back the BLAS threads it pinned and
    the connection it checked the schema on."""
    name = f"metallm-build-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        database_url=f"{DATABASE_URL}?application_name={name}",
        database_schema=f"t_missing_{uuid.uuid4().hex[:8]}",
    )
    config = replay_config(write_outcomes(tmp_path / "o.jsonl", demo_rows(4), ARMS), list(ARMS))
    watch = storage.make_engine(DATABASE_URL)
    with threadpool_limits(2, user_api="blas"):
        with pytest.raises(SchemaMissing, match="metallm migrate"):
            Application.build(settings, config=config, embedder=embedder)
        assert blas_threads() == 2
    with watch.connect() as conn:
        open_connections = conn.execute(
            sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
            {"n": name},
        ).scalar_one()
    watch.dispose()
    assert open_connections == 0


def settings_without_a_model(schema: str, tmp_path) -> Settings:
    """Settings whose embedding model path does not exist: a build fails loading it."""
    return Settings(
        database_url=DATABASE_URL,
        database_schema=schema,
        embedding_model=str(tmp_path / "no-such-model"),
    )


def test_a_second_instance_of_one_name_is_refused_until_the_first_stops(
    pg_schema, tmp_path, embedder
):
    """Two live instances of one name would each skip the other's learning-log notifications:
    the second build is refused, naming METALLM_INSTANCE_ID, and leaves nothing held; once
    the first has stopped, the name is free."""
    from service.log.session import InstanceNameTaken

    config = replay_config(write_outcomes(tmp_path / "o.jsonl", demo_rows(4), ARMS), list(ARMS))
    settings = Settings(
        database_url=DATABASE_URL, database_schema=pg_schema, instance_id="same", metrics_port=None
    )
    first = Application.build(settings, config=config, embedder=embedder)
    try:
        with pytest.raises(InstanceNameTaken, match="METALLM_INSTANCE_ID"):
            Application.build(settings, config=config, embedder=embedder)
        other = Application.build(
            settings.model_copy(update={"instance_id": "other"}), config=config, embedder=embedder
        )
        other.stop()
    finally:
        first.stop()
    Application.build(settings, config=config, embedder=embedder).stop()


def test_a_missing_api_key_is_told_before_the_model_loads(pg_schema, tmp_path, monkeypatch):
    """The arms are built first: an unset API key fails the build at once, naming its
    variable, not after the policy is restored and the embedding model loaded (here the model
    path does not exist, so loading it first would fail with another error)."""
    pytest.importorskip("openai")
    from service.config import ArmError, parse_config

    config = parse_config({"tasks": TASKS, "arms": [arm_with_an_unset_key(monkeypatch)]})
    with pytest.raises(ArmError, match="METALLM_TEST_UNSET_KEY is not set"):
        Application.build(settings_without_a_model(pg_schema, tmp_path), config=config)


def test_a_build_failing_after_the_arms_closes_the_arms_it_built(pg_schema, tmp_path, monkeypatch):
    """The gateway that build made is closed when a later step fails (here loading the
    embedding model); a gateway passed in is the caller's."""
    closed = record_closes(monkeypatch)
    config = replay_config(write_outcomes(tmp_path / "o.jsonl", demo_rows(4), ARMS), list(ARMS))
    settings = settings_without_a_model(pg_schema, tmp_path)
    with pytest.raises(FileNotFoundError, match="METALLM_EMBEDDING_MODEL"):
        Application.build(settings, config=config)
    assert sorted(closed) == sorted(ARMS)

    closed.clear()
    passed_in = Gateway(config)
    with pytest.raises(FileNotFoundError, match="METALLM_EMBEDDING_MODEL"):
        Application.build(settings, config=config, gateway=passed_in)
    assert closed == []
    passed_in.close()


def metrics_text(service: Application) -> str:
    url = f"http://127.0.0.1:{service.metrics_server.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def http_status(service: Application, path: str) -> int:
    url = f"http://127.0.0.1:{service.metrics_server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def metric(scrape: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in scrape.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_redelivered_queries_make_no_new_calls_or_rows(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    rows = demo_rows(60)
    outcomes = write_outcomes(tmp_path / "outcomes.jsonl", rows, ARMS)
    config = replay_config(outcomes, list(ARMS))
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL)
    ensure_topics(settings, [topics["queries_topic"]])
    send(broker, topics["queries_topic"], [(r["query_id"], query_bytes(r)) for r in rows])

    CountingReplay.calls = 0
    blas_before = blas_threads()
    service = build_service(settings, config, embedder)
    assert blas_threads() == 1  # from build on: restoring the policy replays its BLAS updates
    service.start()
    try:
        wait_for(lambda: count(engine, "SELECT count(*) FROM decisions") == 60, message="decisions")
        wait_for(
            lambda: (
                committed_offset(broker, topics["queries_topic"], topics["queries_group"]) == 60
            ),
            message="commit",
        )
    finally:
        service.stop()
    assert CountingReplay.calls == 60
    assert blas_threads() == blas_before  # given back on stop

    # reprocess from offset 20: a new consumer group starts from the beginning of the topic,
    # and the same queries are published again on top
    send(broker, topics["queries_topic"], [(r["query_id"], query_bytes(r)) for r in rows[20:]])
    again = settings.model_copy(update={"queries_group": topics["queries_group"] + "-again"})
    CountingReplay.calls = 0
    service = build_service(again, config, embedder)
    service.start()
    try:
        wait_for(
            lambda: committed_offset(broker, topics["queries_topic"], again.queries_group) == 100,
            message="redelivery",
        )
    finally:
        service.stop()
    assert CountingReplay.calls == 0
    assert count(engine, "SELECT count(*) FROM decisions") == 60
