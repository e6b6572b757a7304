"""`make demo`'s program, run as a user runs it (with recorded answers instead of the models,
to keep it quick): it finishes with the comparison and a plot, and Ctrl-C stops everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from service.migrate import drop_schema
from tests.conftest import DATABASE_URL

pytestmark = pytest.mark.integration


def assert_broker_stopped(output: str) -> None:
    """The demo's own broker (found by the address it printed) is no longer running."""
    address = re.search(r"Kafka \(Tansu\) at (127\.0\.0\.1:\d+)", output).group(1)
    left = subprocess.run(["pgrep", "-f", f"tansu broker.*{address}"], capture_output=True)
    assert left.returncode == 1, f"the demo left its broker at {address} running"


@pytest.fixture
def demo(tmp_path):
    schema = f"demo_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DATABASE_URL": DATABASE_URL, "COLUMNS": "120"}

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "producers.demo",
                "--replay",
                "--schema",
                schema,
                "--output",
                str(tmp_path),
                *args,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    yield start
    drop_schema(DATABASE_URL, schema)


def test_demo_runs_to_the_comparison_and_the_plot(demo, tmp_path):
    proc = demo("--limit", "24", "--rate", "50", "--label-delay", "0.5")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert "router vs single arms on the same 24 labeled queries" in output
    assert "gemma-3-270m alone" in output and "qwen2.5-0.5b alone" in output
    assert "router" in output and "decided" in output
    flat = " ".join(output.split())
    assert "cost vs best arm" in flat and "(best arm)" in flat
    assert re.search(r"the router (saved|spent) \$[0-9.]+ .* the best single arm", flat), flat
    assert "e-0" not in output  # dollars, not exponents
    # warm-started from the recorded outcomes of the 296 queries it does not stream
    assert "the router learned from the recorded outcomes of 296 other queries" in flat, flat
    assert "none of the 24 streamed queries among them" in flat
    assert "What you just saw" in flat and "Where to look next" in flat
    for next_step in ("metallm stats", "metallm bench", "http://localhost:3000"):
        assert next_step in flat
    png = tmp_path / "demo.png"
    assert f"plot saved: {png}" in output.replace("\n", "")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_broker_stopped(output)


def test_ctrl_c_stops_everything_the_demo_started(demo):
    proc = demo("--limit", "200", "--rate", "2", "--cold")  # no warm start: not the point here
    deadline = time.monotonic() + 180
    seen = ""
    while "Kafka (Tansu) at" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert "Kafka (Tansu) at" in seen, seen
    time.sleep(2)  # mid-stream
    proc.send_signal(signal.SIGINT)
    output = seen + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "interrupted" in output
    assert_broker_stopped(output)


@pytest.mark.parametrize(
    ("limit", "says"),
    [("0", "must be at least 1, got 0"), ("321", "at most 320 (the sample's size), got 321")],
)
def test_a_limit_the_sample_cannot_give_is_a_usage_error(demo, limit, says):
    """Refused before a broker or a schema is started: --limit 0 used to run the demo on
    nothing, and --limit 321 on the 320 queries there are, without a word."""
    proc = demo("--limit", limit)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2, output
    assert f"argument --limit: {says}" in output
    assert "Tansu" not in output
