"""Shared test helpers: real datasets, outcomes files for replay arms, Kafka I/O."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from app.application import Application
from producers.demo_data import TASKS, demo_rows  # noqa: F401 (re-exported for the tests)
from service.config import AppConfig, parse_config
from service.context import ContextBuilder, ContextLayout
from service.learning import LivePolicy
from service.llm.gateway import Gateway
from service.llm.replay import ReplayProvider
from service.log.transaction import LearningLog
from service.pacing import BudgetPacer
from service.settings import Settings


def legacy_context() -> ContextBuilder:
    """The raw-embedding context layout: for tests that store decision rows by hand, with
    contexts of their own (rows of a NULL ``context_layout`` are in this layout)."""
    return ContextBuilder(ContextLayout(embedding="legacy"))


def open_learning_log(
    engine: sa.Engine,
    policy: str = "linucb",
    params: dict | None = None,
    budget: BudgetPacer | None = None,
    context: ContextBuilder | None = None,
    **kwargs,
) -> LearningLog:
    """An instance's learning log over a fresh live policy, as ``metallm serve`` builds them
    (``kwargs``: the instance, checkpoint cadence and draws seed)."""
    return LearningLog(engine, LivePolicy(policy, params or {}, budget, context), **kwargs)


def write_outcomes(
    path: Path, rows: list[dict], arms: dict[str, tuple[float, float]], seed: int = 0
) -> Path:
    """An outcomes file where arm ``a`` is right with probability ``arms[a][0]`` and costs
    ``arms[a][1]`` dollars per call."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for row in rows:
            labels = TASKS[row["task"]]["labels"]
            outcome = {}
            for arm, (accuracy, cost) in arms.items():
                wrong = [x for x in labels if x != row["label"]]
                pred = row["label"] if rng.random() < accuracy else rng.choice(wrong)
                outcome[arm] = {"prediction": pred, "cost_usd": cost}
            f.write(json.dumps({**row, "arms": outcome}) + "\n")
    return path


def replay_config(outcomes: Path, arms: list[str]) -> AppConfig:
    return parse_config(
        {
            "tasks": TASKS,
            "arms": [
                {"name": a, "provider": "replay", "model": a, "outcomes": str(outcomes)}
                for a in arms
            ],
        }
    )


def settings_for(
    broker: str, topics: dict[str, str], schema: str, database_url: str, **overrides
) -> Settings:
    return Settings(
        kafka_bootstrap=broker,
        database_url=database_url,
        database_schema=schema,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        **topics,
        **{"metrics_port": 0, **overrides},  # a free port per service
    )


def send(broker: str, topic: str, messages: list[tuple[str | None, bytes | None]]) -> None:
    producer = KafkaProducer(bootstrap_servers=broker, acks="all", linger_ms=5)
    try:
        for key, value in messages:
            producer.send(topic, key=key.encode() if key else None, value=value)
        producer.flush()
    finally:
        producer.close()


def query_bytes(row: dict) -> bytes:
    return json.dumps({k: row[k] for k in ("query_id", "text", "task")}).encode()


def label_bytes(query_id: str, label: str) -> bytes:
    return json.dumps({"query_id": query_id, "label": label}).encode()


def read_topic(broker: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    """Read a topic from the start until ``expected`` messages (or the timeout)."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=int(timeout_s * 1000),
    )
    out = []
    try:
        for message in consumer:
            out.append(message)
            if len(out) >= expected:
                break
    finally:
        consumer.close()
    return out


def metallm_cli(
    schema: str,
    *args: str,
    env: dict[str, str] | None = None,
    check: bool = False,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run the ``metallm`` command line on the test database, in ``schema`` (``env``: more
    environment variables; ``check``: raise on a non-zero exit)."""
    from tests.conftest import DATABASE_URL

    full = {**os.environ, "DATABASE_URL": DATABASE_URL, "METALLM_DATABASE_SCHEMA": schema}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**full, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def committed_offset(broker: str, topic: str, group: str) -> int | None:
    """How many events of ``topic`` ``group`` has committed: its committed offsets summed over
    the topic's partitions (None: none committed)."""
    consumer = KafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        offsets = [consumer.committed(TopicPartition(topic, p)) for p in partitions]
    finally:
        consumer.close()
    committed = [offset for offset in offsets if offset is not None]
    return sum(committed) if committed else None


# ------------------------------------------------------------------ a service on replay arms
ARMS = {"cheap": (0.6, 0.00001), "strong": (0.9, 0.001)}  # accuracy, cost of the two replay arms


class CountingReplay(ReplayProvider):
    """The real replay provider, counting the calls that reach the arm."""

    calls = 0

    async def complete(self, request):
        CountingReplay.calls += 1
        return await super().complete(request)


def counting_gateway(config: AppConfig) -> Gateway:
    """The real gateway over the config's replay arms, counting the calls that reach them."""
    return Gateway(config, {a.name: CountingReplay(a.outcomes, a.model) for a in config.arms})


def arm_with_an_unset_key(monkeypatch) -> dict:
    """An openai arm whose API key variable is not set (so the arm cannot be built)."""
    monkeypatch.delenv("METALLM_TEST_UNSET_KEY", raising=False)
    return {
        "name": "remote",
        "provider": "openai",
        "model": "m",
        "base_url": "http://127.0.0.1:9/v1",
        "api_key_env": "METALLM_TEST_UNSET_KEY",
    }


def record_closes(monkeypatch) -> list[str]:
    """Make the gateway build its real providers as usual, each one's ``close()`` recorded by
    its arm's name in the list returned."""
    from service.llm import gateway as gateway_module

    closed: list[str] = []
    build = gateway_module.build_provider

    def recording(arm):
        provider = build(arm)
        close = provider.close

        def recorded_close() -> None:
            closed.append(arm.name)
            close()

        provider.close = recorded_close
        return provider

    monkeypatch.setattr(gateway_module, "build_provider", recording)
    return closed


def build_service(settings: Settings, config: AppConfig, embedder) -> Application:
    """The real service, its arms replay arms that count their calls."""
    return Application.build(
        settings, config=config, embedder=embedder, gateway=counting_gateway(config)
    )


def count(engine, sql: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).scalar_one()
