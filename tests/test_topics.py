"""Topics for N instances in one consumer group: made with ``METALLM_TOPIC_PARTITIONS``
partitions, the queries and labels topics co-partitioned (checked at start-up), and every
event keyed by its query id, so that a query and its label share a partition number. Against
the real broker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from app.exits import EXIT_INPUT
from consumers.kafka_io import (
    TopicMismatch,
    check_topics,
    create_topics,
    delete_topics,
    ensure_topics,
    make_producer,
    partition_counts,
)
from producers.demo_data import TASKS
from producers.publish import publish
from service.events import LabelEvent, QueryEvent
from service.settings import Settings
from tests.conftest import DATABASE_URL
from tests.helpers import metallm_cli, read_topic, settings_for

pytestmark = pytest.mark.integration

OUTCOMES = Path(__file__).parents[1] / "producers" / "data" / "demo_outcomes.jsonl"
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) ")


def stream_topics(topics: dict[str, str]) -> list[str]:
    return [topics[k] for k in ("queries_topic", "labels_topic", "decisions_topic", "dlq_topic")]


def test_the_default_is_six_partitions_and_at_least_one(monkeypatch):
    assert Settings().topic_partitions == 6
    monkeypatch.setenv("METALLM_TOPIC_PARTITIONS", "3")
    assert Settings().topic_partitions == 3
    with pytest.raises(ValueError, match="topic_partitions"):
        Settings(topic_partitions=0)


def test_topics_are_created_with_the_settings_partition_count(broker, topics, pg_schema):
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL, topic_partitions=4)
    ensure_topics(settings, stream_topics(topics)[:3])
    ensure_topics(settings, [topics["dlq_topic"]], partitions=2)  # an explicit count wins
    assert partition_counts(settings, stream_topics(topics)) == {
        topics["queries_topic"]: 4,
        topics["labels_topic"]: 4,
        topics["decisions_topic"]: 4,
        topics["dlq_topic"]: 2,
    }
    check_topics(settings)  # co-partitioned with the setting: no complaint

    # a topic that exists is left as it is, whatever the setting says now
    ensure_topics(settings.model_copy(update={"topic_partitions": 1}), stream_topics(topics))
    assert set(partition_counts(settings, stream_topics(topics)).values()) == {4, 2}


def test_the_shared_helpers_create_and_delete_only_what_they_must(broker, topics):
    """``create_topics`` / ``delete_topics``, which the bench, the benchmarks and the tests
    share, given bootstrap servers: each says what it changed, and doing it again changes
    nothing."""
    first, second = topics["queries_topic"], topics["labels_topic"]
    assert create_topics(broker, [first, second], 3) == [first, second]
    assert partition_counts(broker, [first, second]) == {first: 3, second: 3}
    assert create_topics(broker, [first], 5) == []  # there already: left as it is
    assert partition_counts(broker, [first]) == {first: 3}
    assert delete_topics(broker, [first, topics["dlq_topic"]]) == [first]  # the dlq never was
    assert delete_topics(broker, [first]) == []
    assert partition_counts(broker, [second]) == {second: 3}


def test_topics_of_another_count_are_refused_naming_the_setting(broker, topics, pg_schema):
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL)  # the default, 6
    queries, labels = topics["queries_topic"], topics["labels_topic"]
    assert partition_counts(settings, [queries]) == {queries: None}
    with pytest.raises(TopicMismatch, match=f"{re.escape(queries)} does not exist"):
        check_topics(settings)

    # both made with 1 partition (a deployment from before the setting): the setting is off
    create_topics(broker, [queries], 1)
    create_topics(broker, [labels], 1)
    ensure_topics(settings, [queries, labels])  # existing: left alone
    with pytest.raises(TopicMismatch) as refused:
        check_topics(settings)
    message = str(refused.value)
    assert "METALLM_TOPIC_PARTITIONS=6" in message
    assert f"{queries} has 1, {labels} has 1" in message
    assert "set METALLM_TOPIC_PARTITIONS=1, or recreate both topics with 6" in message
    check_topics(settings.model_copy(update={"topic_partitions": 1}))  # the fix named works


def test_queries_and_labels_of_different_counts_are_refused(broker, topics, pg_schema):
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL)
    queries, labels = topics["queries_topic"], topics["labels_topic"]
    create_topics(broker, [labels], 2)
    ensure_topics(settings, [queries, labels])  # queries made with 6
    for partitions in (6, 2):  # no setting fits both
        with pytest.raises(TopicMismatch) as refused:
            check_topics(settings.model_copy(update={"topic_partitions": partitions}))
        message = str(refused.value)
        assert f"METALLM_TOPIC_PARTITIONS={partitions} partitions each" in message
        assert f"{queries} has 6, {labels} has 2" in message
        wrong = labels if partitions == 6 else queries
        assert message.endswith(f"recreate {wrong} with {partitions}")


def test_a_query_and_its_label_land_in_the_same_partition(broker, topics, pg_schema):
    """``metallm produce`` (producers.publish) keys both by query id: the default
    partitioner then maps a query and its label to the same partition number."""
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL)
    queries, labels = topics["queries_topic"], topics["labels_topic"]
    ensure_topics(settings, [queries, labels])
    ids = [f"q-{i}" for i in range(60)]
    producer = make_producer(settings)
    try:
        publish(
            producer,
            queries,
            [QueryEvent(query_id=q, text="is it?", task="boolq") for q in ids],
            show_progress=False,
        )
        publish(
            producer,
            labels,
            [LabelEvent(query_id=q, label="yes") for q in reversed(ids)],
            show_progress=False,
        )
    finally:
        producer.close()
    query_partition = {m.key.decode(): m.partition for m in read_topic(broker, queries, 60)}
    label_partition = {m.key.decode(): m.partition for m in read_topic(broker, labels, 60)}
    assert set(query_partition) == set(ids)
    assert label_partition == query_partition
    assert len(set(query_partition.values())) > 1  # spread over the partitions


def test_serve_refuses_topics_of_another_count_in_one_line(broker, topics, pg_schema, tmp_path):
    config = tmp_path / "metallm.yaml"
    arms = [
        {"name": a, "provider": "replay", "model": a, "outcomes": str(OUTCOMES)}
        for a in ("gemma-3-270m", "qwen2.5-0.5b")
    ]
    config.write_text(yaml.safe_dump({"tasks": TASKS, "arms": arms}))
    for topic in (topics["queries_topic"], topics["labels_topic"]):
        create_topics(broker, [topic], 1)
    env = {f"METALLM_{k.upper()}": v for k, v in topics.items()}
    env |= {
        "METALLM_KAFKA_BOOTSTRAP": broker,
        "METALLM_CONFIG": str(config),
        "METALLM_METRICS_PORT": "0",
        "METALLM_TOPIC_PARTITIONS": "6",
    }
    out = metallm_cli(pg_schema, "serve", env=env, timeout=120)
    assert out.returncode == EXIT_INPUT, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("metallm: the queries and labels topics must be co-partitioned")
    assert "set METALLM_TOPIC_PARTITIONS=1" in lines[0]
