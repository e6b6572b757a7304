"""What ``metallm serve`` tells the person running it: one block at start (config, arms, the
database with its password hidden, topics, instance, policy, metrics), progress lines at the
set cadence, what its stop waits for, and no library noise. A real process on the real broker
and Postgres, with metrics off: no port bound, and the service still works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from sqlalchemy.engine import make_url

from producers.demo_data import TASKS, demo_rows
from producers.local_broker import free_port
from service.metrics import MetricsPortUnavailable, MetricsServer
from tests.conftest import DATABASE_URL, wait_for
from tests.helpers import label_bytes, query_bytes, send

pytestmark = pytest.mark.integration

OUTCOMES = Path(__file__).parents[1] / "producers" / "data" / "demo_outcomes.jsonl"
ARMS = ("gemma-3-270m", "qwen2.5-0.5b")


def test_serve_with_metrics_off_says_what_it_runs_and_does(broker, topics, pg_schema, tmp_path):
    config = tmp_path / "metallm.yaml"
    arms = [{"name": a, "provider": "replay", "model": a, "outcomes": str(OUTCOMES)} for a in ARMS]
    config.write_text(yaml.safe_dump({"tasks": TASKS, "arms": arms}))
    # trust authentication ignores the password; the service must never show it
    url = make_url(DATABASE_URL).set(password="s3cret-pw").render_as_string(hide_password=False)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "METALLM_DATABASE_SCHEMA": pg_schema,
        "METALLM_KAFKA_BOOTSTRAP": broker,
        "METALLM_CONFIG": str(config),
        "METALLM_METRICS_PORT": "off",
        "METALLM_PROGRESS_SECONDS": "1",
        "METALLM_SESSION_TIMEOUT_MS": "2000",
        "METALLM_HEARTBEAT_INTERVAL_MS": "500",
        "METALLM_INSTANCE_ID": "serve-output-test",
        **{f"METALLM_{name.upper()}": value for name, value in topics.items()},
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        wait_for(lambda: "serving:" in log_path.read_text(), 120, 0.2, "the start block")
        listening = [
            c for c in psutil.Process(proc.pid).net_connections("inet") if c.status == "LISTEN"
        ]
        assert listening == []  # metrics off: no HTTP server, no port
        rows = demo_rows(6)
        send(broker, topics["queries_topic"], [(r["query_id"], query_bytes(r)) for r in rows])
        send(
            broker,
            topics["labels_topic"],
            [(r["query_id"], label_bytes(r["query_id"], r["label"])) for r in rows],
        )
        wait_for(
            lambda: "since start: 6 decided, 6 labels, 6 rewards learned" in log_path.read_text(),
            60,
            0.5,
            "a progress line with the 6 queries decided and learned from",
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    log = log_path.read_text()
    assert proc.returncode == 0, log

    lines = log[log.index("serving:") :].splitlines()[1:]
    block = lines[: next(i for i, line in enumerate(lines) if not line.startswith("  "))]
    fields = dict(line.strip().split(None, 1) for line in block)
    assert fields["config"] == str(config.resolve())
    assert fields["tasks"] == ", ".join(sorted(TASKS))  # as safe_dump wrote them
    assert fields["arms"] == ", ".join(f"{a} (replay {a})" for a in ARMS)
    shown = make_url(url).render_as_string(hide_password=True)  # postgresql://postgres:***@…
    assert fields["database"] == f"{shown}, schema {pg_schema}" and ":***@" in shown
    assert fields["reads"] == (
        f"{topics['queries_topic']} (group {topics['queries_group']}) and "
        f"{topics['labels_topic']} (group {topics['labels_group']}), 6 partitions each"
    )
    assert fields["instance"] == "serve-output-test"
    assert fields["policy"].startswith('correctness_ucb {"alpha": 0.5, "epsilon": 0.02, "seed": 0}')
    assert fields["context"].startswith("v1 ")
    assert fields["metrics"].startswith("off (METALLM_METRICS_PORT=off")
    assert fields["door"].startswith("off (METALLM_HTTP_PORT unset)")
    assert fields["progress"] == "every 1 s"
    assert "s3cret-pw" not in log

    assert "stopping: the consumers finish the batches in hand" in log
    assert "Traceback" not in log
    noise = [
        line for line in log.splitlines() if " WARNING kafka" in line or " ERROR kafka" in line
    ]
    assert noise == []


def test_a_taken_metrics_port_says_what_to_do():
    port = free_port()
    first = MetricsServer(port, lambda: True).start()
    try:
        with pytest.raises(MetricsPortUnavailable) as info:
            MetricsServer(port, lambda: True)
    finally:
        first.stop()
    assert str(info.value) == (
        f"cannot serve metrics on port {port}: Address already in use; set "
        "METALLM_METRICS_PORT to another port, 0 for any free one, or off for none (no "
        "/healthz, /readyz)"
    )
