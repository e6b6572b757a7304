"""``metallm bench --through-service``: the real path (Kafka → service → Postgres with replay
arms) makes exactly the decisions of the fast in-process replay, and leaves a decisions table
that ``metallm evaluate --from-db`` reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.cli import main
from service.migrate import drop_schema
from tests.conftest import DATABASE_URL
from tests.helpers import demo_rows, write_outcomes

pytestmark = pytest.mark.integration


def test_service_decides_like_the_fast_path(
    broker, tmp_path: Path, cached_embedder, embedding_cache_path, monkeypatch, capsys
) -> None:
    rows = demo_rows(48)
    outcomes = write_outcomes(
        tmp_path / "o.jsonl", rows, {"small": (0.55, 1e-5), "big": (0.9, 1e-3)}, seed=3
    )
    lines = outcomes.read_text().splitlines()
    for i in range(13, 48, 3):  # recorded failures of the big arm on streamed queries
        record = json.loads(lines[i])
        record["arms"]["big"]["prediction"] = None
        lines[i] = json.dumps(record)
    outcomes.write_text("\n".join(lines) + "\n")
    cached_embedder.embed([r["text"] for r in rows])

    schema = "bench_" + tmp_path.name.replace("-", "_")[-20:].lower()
    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("METALLM_KAFKA_BOOTSTRAP", broker)
    monkeypatch.setenv("METALLM_SESSION_TIMEOUT_MS", "2000")
    monkeypatch.setenv("METALLM_HEARTBEAT_INTERVAL_MS", "500")
    monkeypatch.setenv("METALLM_POLICY_PARAMS", '{"alpha": 0.5, "epsilon": 0.2}')
    out = tmp_path / "out"
    args = [
        "bench", str(outcomes), "--delay", "4", "--warm-start", "0.25", "--lambda", "0.3",
        "--no-sweep", "--no-baselines", "--no-plots", "--through-service",
        "--db-schema", schema, "--embedding-cache", str(embedding_cache_path),
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    from service.storage import make_engine

    engine = make_engine(DATABASE_URL)
    try:
        assert main(args) == 0, capsys.readouterr().err
        report = json.loads((out / "results.json").read_text())["through_service"]
        assert report["identical"] and report["same_decisions"] == report["queries"] == 36
        assert "36/36 decisions identical" in capsys.readouterr().out

        with engine.connect() as conn:
            conn.execute(sa.text(f'SET search_path TO "{schema}"'))
            counts = conn.execute(
                sa.text(
                    "SELECT count(*), count(reward), count(*) FILTER (WHERE status='llm_error'), "
                    "count(DISTINCT arm), min(propensity) FROM decisions"
                )
            ).one()
        total, rewarded, failed, arms, min_p = counts
        assert (total, rewarded) == (36, 36)
        assert failed > 0  # the failure path ran, and still matched
        assert arms == 2 and min_p >= 0.1 - 1e-9  # ε = 0.2 over 2 arms

        monkeypatch.setenv("METALLM_DATABASE_SCHEMA", schema)
        assert (
            main(
                ["evaluate", "--from-db", "--target", "logged", "--json", str(tmp_path / "e.json")]
            )
            == 0
        )
        [logged] = json.loads((tmp_path / "e.json").read_text())
        assert logged["lambda"] == pytest.approx(0.3)  # the λ the service logged
        assert logged["ips"]["value"] == pytest.approx(logged["observed_mean_reward"])
    finally:
        engine.dispose()
        drop_schema(DATABASE_URL, schema)
