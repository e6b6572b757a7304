"""Declared metadata features, end to end: a file where the arm that pays depends only on a
metadata category. The router given the feature finds it, the embedding-only router cannot,
and the service (metadata through Kafka, the same context builder) decides exactly like the
benchmark."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from app.cli import main
from tests.conftest import DATABASE_URL
from tests.helpers import demo_rows

pytestmark = pytest.mark.integration


def category_file(path: Path, n: int, seed: int = 0) -> Path:
    """Arm ``left`` is right exactly on category ``x``, arm ``right`` on ``y``; same price.
    The category is drawn independently of the text, so the embedding says nothing of it."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i, row in enumerate(demo_rows(n)):
            category = rng.choice(["x", "y"])
            wrong = "b"
            f.write(
                json.dumps(
                    {
                        "query_id": f"m{i}",
                        "text": row["text"],
                        "task": row["task"],
                        "options": ["a", "b"],
                        "label": "a",
                        "metadata": {"category": category, "note": [1, 2]},
                        "arms": {
                            "left": {
                                "prediction": "a" if category == "x" else wrong,
                                "cost_usd": 1e-5,
                            },
                            "right": {
                                "prediction": "a" if category == "y" else wrong,
                                "cost_usd": 1e-5,
                            },
                        },
                    }
                )
                + "\n"
            )
    return path


def _bench(outcomes: Path, out: Path, cache: Path, *extra: str) -> dict:
    args = [
        "bench", str(outcomes), "--delay", "10", "--lambda", "0", "--no-sweep",
        "--no-baselines", "--no-plots", "--quiet", "--embedding-cache", str(cache),
        "--out", str(out), *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


def test_a_declared_category_is_learned_and_the_embedding_alone_cannot(
    tmp_path: Path, cached_embedder, embedding_cache_path
) -> None:
    outcomes = category_file(tmp_path / "cat.jsonl", 300)
    cached_embedder.embed([json.loads(line)["text"] for line in outcomes.read_text().splitlines()])
    with_feature = _bench(
        outcomes, tmp_path / "f", embedding_cache_path, "--feature", "category:categorical"
    )
    text_only = _bench(outcomes, tmp_path / "t", embedding_cache_path)
    raw = _bench(outcomes, tmp_path / "r", embedding_cache_path, "--context-embedding", "raw")
    accuracy = {
        name: result["methods"]["router"]["accuracy"]["mean"]
        for name, result in (("feature", with_feature), ("text", text_only), ("raw", raw))
    }
    assert accuracy["feature"] > 0.9, accuracy  # ~10 blind decisions, then the right arm
    assert accuracy["text"] < 0.7 and accuracy["raw"] < 0.7, accuracy
    assert "category:categorical/256" in with_feature["config"]["context_layout"]
    assert "category" not in text_only["config"]["context_layout"]


def test_a_bad_declared_value_is_reported_with_its_line(
    tmp_path: Path, cached_embedder, embedding_cache_path, capsys
) -> None:
    outcomes = category_file(tmp_path / "cat.jsonl", 12)
    cached_embedder.embed([json.loads(line)["text"] for line in outcomes.read_text().splitlines()])
    args = [
        "bench", str(outcomes), "--feature", "category:numeric", "--no-sweep", "--quiet",
        "--embedding-cache", str(embedding_cache_path), "--out", str(tmp_path / "o"),
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "line 1: metadata.category is declared numeric but is" in err
    assert main([*args[:3], "subject:ordinal", *args[4:]]) != 0
    assert "categorical or numeric" in capsys.readouterr().err


def test_the_service_uses_the_feature_as_the_benchmark_does(
    broker, tmp_path: Path, cached_embedder, embedding_cache_path, monkeypatch, capsys
) -> None:
    outcomes = category_file(tmp_path / "cat.jsonl", 40, seed=1)
    cached_embedder.embed([json.loads(line)["text"] for line in outcomes.read_text().splitlines()])
    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("METALLM_KAFKA_BOOTSTRAP", broker)
    monkeypatch.setenv("METALLM_SESSION_TIMEOUT_MS", "2000")
    monkeypatch.setenv("METALLM_HEARTBEAT_INTERVAL_MS", "500")
    schema = "bench_" + tmp_path.name.replace("-", "_")[-20:].lower()
    from service.migrate import drop_schema

    try:
        result = _bench(
            outcomes,
            tmp_path / "s",
            embedding_cache_path,
            "--feature",
            "category:categorical",
            "--through-service",
            "--db-schema",
            schema,
        )
        report = result["through_service"]
        assert report["identical"] and report["same_decisions"] == 40
        import sqlalchemy as sa

        from service.storage import make_engine

        engine = make_engine(DATABASE_URL, schema)
        with engine.connect() as conn:
            layouts = (
                conn.execute(sa.text("SELECT DISTINCT context_layout FROM decisions"))
                .scalars()
                .all()
            )
        engine.dispose()
        assert layouts == [result["config"]["context_layout"]]
    finally:
        drop_schema(DATABASE_URL, schema)
