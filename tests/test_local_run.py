"""The README's five-minute tour, as a user types it: `metallm broker`,
`migrate`, `serve`, `produce queries`, `produce labels`, `stats` — each a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from app.exits import EXIT_INPUT
from producers.demo_data import TASKS, demo_rows
from producers.local_broker import free_port
from service.migrate import drop_schema
from service.storage import make_engine
from tests.conftest import DATABASE_URL, wait_for

pytestmark = pytest.mark.integration

OUTCOMES = Path(__file__).parents[1] / "producers" / "data" / "demo_outcomes.jsonl"


def metallm(*args: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def start(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    return proc.returncode, out


def labeled_decisions(schema: str) -> int:
    """How many decisions have their label (and reward) stored."""
    engine = make_engine(DATABASE_URL, schema)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT count(*) FROM decisions WHERE label IS NOT NULL")
            ).scalar_one()
    finally:
        engine.dispose()


@pytest.fixture
def schema():
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    drop_schema(DATABASE_URL, name)


def test_broker_migrate_serve_produce_stats(schema, tmp_path):
    config = tmp_path / "metallm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tasks": TASKS,
                "arms": [
                    {"name": a, "provider": "replay", "model": a, "outcomes": str(OUTCOMES)}
                    for a in ("gemma-3-270m", "qwen2.5-0.5b")
                ],
            }
        )
    )
    rows = demo_rows(16)
    data = tmp_path / "labeled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": DATABASE_URL,
        "METALLM_DATABASE_SCHEMA": schema,
        "METALLM_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        "METALLM_CONFIG": str(config),
        "METALLM_METRICS_PORT": "0",
        "METALLM_SESSION_TIMEOUT_MS": "2000",
        "METALLM_HEARTBEAT_INTERVAL_MS": "500",
        "COLUMNS": "100",
    }

    broker = start("broker", "--port", str(port), env=env)
    serve = None
    try:
        first = broker.stdout.readline()
        assert f"at 127.0.0.1:{port}; Ctrl-C stops it" in first, first
        taken = metallm("broker", "--port", str(port), env=env)
        assert taken.returncode == EXIT_INPUT and "already in use" in taken.stderr

        migrated = metallm("migrate", env=env)
        assert migrated.returncode == 0 and "up to date" in migrated.stdout, migrated.stderr
        serve = start("serve", env=env)
        queries = metallm("produce", "queries", str(data), "--quiet", env=env)
        assert queries.returncode == 0, queries.stderr
        assert "published 16 queries to metallm.queries" in queries.stdout
        labels = metallm("produce", "labels", str(data), "--quiet", env=env)
        assert labels.returncode == 0 and "published 16 labels" in labels.stdout

        # polled in Postgres (a `metallm stats` process a second would compete with serve for
        # the CPU); the command is then run once on the finished work
        wait_for(
            lambda: labeled_decisions(schema) == len(rows),
            timeout=180,
            interval=0.3,
            message="16 labeled decisions",
        )
        out = metallm("stats", "--format", "json", "--hours", "0", env=env)
        assert out.returncode == 0, out.stderr
        summary = [json.loads(line) for line in out.stdout.splitlines()]
        assert sum(r["labeled"] for r in summary) == len(rows)
        assert sum(r["decisions"] for r in summary) == len(rows)
        table = metallm("stats", env=env)
        assert table.returncode == 0, table.stderr
        assert "per arm (view arm_summary)" in table.stdout and "accuracy" in table.stdout
        assert "%" in table.stdout and "$" in table.stdout
    finally:
        if serve is not None:
            served, serve_log = stop(serve)
        stopped, broker_log = stop(broker)
    assert served == 0, serve_log
    assert "policy checkpoint saved (16 updates" in serve_log
    assert stopped == 0 and "broker stopped" in broker_log, broker_log
