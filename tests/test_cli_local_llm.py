"""The CLI as a user runs it: migrate, serve (real local LLMs via llama.cpp), produce, decisions.
``metallm serve`` runs as a process of its own (signals, exit code); the other commands go
through the CLI's ``main`` in this process (a process each costs seconds of imports), with
the same arguments, environment, exit codes and output."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.cli import main
from service.storage import make_engine
from tests.conftest import DATABASE_URL, wait_for
from tests.helpers import TASKS, count, demo_rows, metallm_cli

pytestmark = [pytest.mark.integration, pytest.mark.llm]

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make install`")


def in_process(capsys, *args: str, check: bool) -> subprocess.CompletedProcess:
    """``metallm *args`` through the CLI's main in this process: its exit code and output
    (``check``: raise on a non-zero exit, as ``subprocess.run`` does)."""
    code = main(list(args))
    done = subprocess.CompletedProcess(["metallm", *args], code, *capsys.readouterr())
    if check:
        done.check_returncode()
    return done


def test_serve_real_local_llms_end_to_end(broker, topics, tmp_path: Path, monkeypatch, capsys):
    import uuid

    schema = f"t_{uuid.uuid4().hex[:12]}"
    config = tmp_path / "metallm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tasks": TASKS,
                "arms": [
                    {
                        "name": "gemma",
                        "provider": "llamacpp",
                        "model": "gemma-3-270m",
                        "input_price_per_1m": 0.05,
                        "output_price_per_1m": 0.1,
                        "n_threads": 1,
                    },
                    {
                        "name": "qwen",
                        "provider": "llamacpp",
                        "model": "qwen2.5-0.5b-instruct",
                        "input_price_per_1m": 0.5,
                        "output_price_per_1m": 1.5,
                        "n_threads": 1,
                    },
                ],
            }
        )
    )
    rows = [r for r in demo_rows() if r["task"] != "intent"][:8]
    dataset = tmp_path / "queries.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {
        **os.environ,
        "DATABASE_URL": DATABASE_URL,
        "METALLM_DATABASE_SCHEMA": schema,
        "METALLM_KAFKA_BOOTSTRAP": broker,
        "METALLM_CONFIG": str(config),
        "METALLM_SESSION_TIMEOUT_MS": "2000",
        "METALLM_HEARTBEAT_INTERVAL_MS": "500",
        "METALLM_CHECKPOINT_EVERY": "1000",
        "METALLM_METRICS_PORT": "0",
        **{f"METALLM_{k.upper()}": v for k, v in topics.items()},
    }
    for name, value in env.items():
        if name == "DATABASE_URL" or name.startswith("METALLM_"):
            monkeypatch.setenv(name, value)
    # main sets libpq's connect timeout if unset: restored after the test
    monkeypatch.setenv("PGCONNECT_TIMEOUT", os.environ.get("PGCONNECT_TIMEOUT", "10"))
    metallm = functools.partial(in_process, capsys, check=True)

    # serving before migrating is a clear error, not a traceback
    early = metallm_cli(schema, "serve", env=env, timeout=120)
    assert early.returncode == 2 and "run `metallm migrate`" in early.stderr

    assert "up to date" in metallm("migrate").stdout
    metallm("migrate")  # idempotent
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        metallm("produce", "queries", str(dataset), "--quiet")
        metallm("produce", "labels", str(dataset), "--quiet", "--delay-seconds", "1")

        # polled in Postgres (a `metallm decisions` process a second would compete with the
        # local LLMs for the CPU); the command is then run once on the finished work
        engine = make_engine(DATABASE_URL, schema)
        try:
            wait_for(
                lambda: (
                    count(engine, "SELECT count(*) FROM decisions WHERE reward IS NOT NULL")
                    == len(rows)
                ),
                timeout=180,
                interval=0.3,
                message="decisions with rewards",
            )
        finally:
            engine.dispose()
        out = metallm("decisions", "--format", "json").stdout
        decisions = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert len(decisions) == len(rows)
        assert all(d["reward"] is not None for d in decisions)
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    assert server.returncode == 0, output
    assert "policy checkpoint saved (8 updates" in output  # SIGTERM: finish, checkpoint, exit

    labels = {r["query_id"]: r["label"] for r in rows}
    for d in decisions:
        assert d["arm"] in {"gemma", "qwen"}
        assert d["status"] == "ok", d  # grammar-constrained decoding always parses
        assert d["prediction"] in TASKS[d["task"]]["labels"]
        assert d["input_tokens"] > 10 and d["output_tokens"] >= 1
        price = (0.05, 0.1) if d["arm"] == "gemma" else (0.5, 1.5)
        assert d["cost_usd"] == pytest.approx(
            (d["input_tokens"] * price[0] + d["output_tokens"] * price[1]) / 1e6
        )
        assert d["correct"] == (d["prediction"] == labels[d["query_id"]])

    table = metallm("decisions", "--arm", "gemma").stdout
    assert "decisions" in table
    csv_out = metallm("decisions", "--format", "csv", "--task", "sentiment").stdout
    assert csv_out.splitlines()[0].startswith("query_id,")
    assert all(",sentiment," in line for line in csv_out.splitlines()[1:])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query_id": "", "text": "x", "task": "sentiment"}\n')
    refused = metallm("produce", "queries", str(bad), check=False)
    assert refused.returncode == 2 and f"{bad}:1: query_id" in refused.stderr

    from service.migrate import drop_schema

    drop_schema(DATABASE_URL, schema)
