"""`metallm stats` and `metallm decisions` as a person reads them, at the terminal's width, on
the real Postgres through the real CLI; `--format csv|json` keep the exact values."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from rich.cells import cell_len

from service import storage
from service.log import decisions as decision_sql
from service.report import duration_ms, percent, usd
from tests.helpers import metallm_cli

pytestmark = pytest.mark.integration

ARMS = {"gemma-3-270m": (0.0000742, 180.0), "qwen2.5-0.5b-instruct": (0.00123, 1530.0)}


@pytest.fixture
def decided(engine):
    """13 decisions over two arms (4 of them correct of 13 labeled on the first arm: an
    accuracy that is no short decimal), as the service stores them."""
    now = datetime.now(UTC)
    rows = []
    for i in range(20):
        arm = "gemma-3-270m" if i < 13 else "qwen2.5-0.5b-instruct"
        cost, latency = ARMS[arm]
        correct = (i % 3 == 0) if i < 13 else True
        rows.append(
            {
                "query_id": f"bigbench-sentiment-{i:04d}",
                "task": "sentiment",
                "text": "t",
                "options": ["positive", "negative"],
                "arm": arm,
                "propensity": 0.9123,
                "probabilities": {"gemma-3-270m": 0.9123, "qwen2.5-0.5b-instruct": 0.0877},
                "arm_scores": {"gemma-3-270m": 0.8123456, "qwen2.5-0.5b-instruct": 0.5},
                "policy": "linucb",
                "status": "ok",
                "prediction": "positive",
                "cost_usd": cost,
                "latency_ms": latency,
                "embedding_model": "m",
                "context": storage.vector_to_bytes(np.zeros(2)),
                "label": "positive" if correct else "negative",
                "correct": correct,
                "reward": 1.0 - 0.1 * cost / 0.001 if correct else -0.1 * cost / 0.001,
                "decided_at": now - timedelta(seconds=20 - i),
            }
        )
    with engine.begin() as conn:
        decision_sql.insert_decisions(conn, rows)
    return engine


def lines_of(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


def assert_fits(out: str, width: int) -> None:
    assert out.strip()
    too_wide = [line for line in out.splitlines() if cell_len(line) > width]
    assert not too_wide, too_wide
    assert "…" not in out, out  # nothing cut: not a header, not a value


def test_number_formats():
    assert percent(0.30769230769230769231) == "30.8%"
    assert usd(7.42e-05) == "$0.0000742" and usd(0.002) == "$0.002" and usd(1234.5) == "$1,234.50"
    assert usd(-0.5) == "-$0.5" and usd(None) == ""
    assert duration_ms(0.5) == "0.50 ms" and duration_ms(999) == "999 ms"
    assert duration_ms(1530) == "1.53 s" and duration_ms(90_000) == "1.5 min"


def test_stats_at_80_columns_shows_whole_columns_in_human_units(decided, pg_schema):
    out = metallm_cli(pg_schema, "stats", "--hours", "1", env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    assert_fits(out.stdout, 80)
    text = out.stdout
    for header in ("arm", "decisions", "accuracy", "share", "cost"):
        assert header in text
    gemma = next(line for line in lines_of(text) if "gemma-3-270m" in line)
    assert "13" in gemma and "38.5%" in gemma and "65.0%" in gemma  # 5 of 13, 13 of 20
    assert "$0.000965" in gemma  # 13 × $0.0000742, in dollars, not 9.646e-04
    assert "e-0" not in text and "0.3846" not in text
    assert "not shown at 80 columns:" in " ".join(text.split())  # the ones left out are named


def test_stats_on_a_wide_terminal_shows_every_column(decided, pg_schema):
    out = metallm_cli(pg_schema, "stats", "--hours", "0", env={"COLUMNS": "200"})
    assert_fits(out.stdout, 200)
    header = next(line for line in lines_of(out.stdout) if "accuracy" in line)
    for name in ("arm", "decisions", "share", "labeled", "accuracy", "cost/decision"):
        assert name in header
    assert "mean reward" in header and "latency" in header and "failures" in header
    qwen = next(line for line in lines_of(out.stdout) if "qwen2.5-0.5b-instruct" in line)
    assert "100.0%" in qwen and "1.53 s" in qwen and "$0.00861" in qwen  # 7 × $0.00123
    assert "not shown" not in out.stdout


def test_a_narrow_terminal_gets_one_block_per_arm(decided, pg_schema):
    out = metallm_cli(pg_schema, "stats", "--hours", "0", env={"COLUMNS": "36"})
    assert_fits(out.stdout, 36)
    lines = [line.strip() for line in lines_of(out.stdout)]
    assert "arm  gemma-3-270m" in lines and "accuracy  38.5%" in lines
    assert "latency  180 ms" in lines and "cost/decision  $0.0000742" in lines


def test_decisions_at_80_columns(decided, pg_schema):
    out = metallm_cli(pg_schema, "decisions", env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    assert_fits(out.stdout, 80)
    row = next(line for line in lines_of(out.stdout) if "bigbench-sentiment-0013" in line)
    assert "qwen2.5-0.5b-instruct" in row and "yes" in row  # the id, the arm, correct
    header = next(line for line in lines_of(out.stdout) if "query_id" in line)
    assert "arm" in header and "correct" in header
    assert "not shown at 80 columns:" in " ".join(out.stdout.split())

    wide = metallm_cli(pg_schema, "decisions", "--limit", "2", env={"COLUMNS": "250"}).stdout
    assert_fits(wide, 250)
    first = next(line for line in lines_of(wide) if "bigbench-sentiment-0000" in line)
    assert "$0.0000742" in first and "180 ms" in first and "0.912" in first  # cost, latency, p


def test_explain_at_80_columns(decided, pg_schema):
    out = metallm_cli(
        pg_schema, "decisions", "--explain", "bigbench-sentiment-0001", env={"COLUMNS": "80"}
    )
    assert out.returncode == 0, out.stderr
    assert_fits(out.stdout, 80)
    text = " ".join(out.stdout.split())
    assert "linucb chose gemma-3-270m (p = 91.2%)" in text
    assert "0.8123" in text and "8.8%" in text  # the scores and the probabilities
    assert "cost $0.0000742, latency 180 ms; label 'negative': wrong" in text


def test_csv_and_json_keep_the_exact_values(decided, pg_schema):
    out = metallm_cli(pg_schema, "stats", "--format", "json", "--hours", "0")
    gemma = next(r for r in map(json.loads, out.stdout.splitlines()) if r["arm"] == "gemma-3-270m")
    assert float(gemma["accuracy"]) == pytest.approx(5 / 13, rel=1e-12)
    assert gemma["cost_usd"] == pytest.approx(13 * 0.0000742, rel=1e-12)

    rows = list(
        csv.DictReader(io.StringIO(metallm_cli(pg_schema, "decisions", "--format", "csv").stdout))
    )
    assert len(rows) == 20
    assert float(rows[0]["cost_usd"]) == 0.0000742 and float(rows[0]["propensity"]) == 0.9123
    assert float(rows[0]["latency_ms"]) == 180.0 and rows[0]["correct"] == "True"
