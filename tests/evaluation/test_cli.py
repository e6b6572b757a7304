"""The evaluation commands as a user runs them: record, bench, evaluate --from-db."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import yaml

from app.cli import main
from service.outcomes import read_outcomes
from tests.conftest import DATABASE_URL
from tests.helpers import TASKS, demo_rows, write_outcomes


def test_record_command_with_the_builtin_set(tmp_path: Path, capsys) -> None:
    source = write_outcomes(
        tmp_path / "source.jsonl", demo_rows(), {"small": (0.6, 1e-5), "big": (0.9, 1e-3)}
    )
    config = tmp_path / "metallm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tasks": TASKS,
                "arms": [
                    {"name": a, "provider": "replay", "model": a, "outcomes": str(source)}
                    for a in ("small", "big")
                ],
            }
        )
    )
    out = tmp_path / "recorded.jsonl"
    args = ["record", "--builtin", "--limit", "12", "--config", str(config), "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    assert "wrote 12 queries" in capsys.readouterr().out
    assert [r.query_id for r in read_outcomes(out)] == [r["query_id"] for r in demo_rows(12)]
    assert main([*args[:3], "20", *args[4:], "--quiet"]) == 0  # resumes: 8 more
    assert "wrote 8 queries" in capsys.readouterr().out and len(read_outcomes(out)) == 20
    assert main(["record", "data.jsonl", "--builtin", "--out", str(out)]) == 2
    assert "not both" in capsys.readouterr().err


def test_bench_command_writes_table_json_and_plots(
    tmp_path: Path, cached_embedder, embedding_cache_path, capsys
) -> None:
    rows = demo_rows(80)
    outcomes = write_outcomes(
        tmp_path / "o.jsonl", rows, {"small": (0.6, 1e-5), "big": (0.9, 1e-3)}
    )
    cached_embedder.embed([r["text"] for r in rows])  # so the command finds them cached
    out = tmp_path / "out"
    code = main(
        [
            "bench",
            str(outcomes),
            "--delay",
            "5",
            "--seeds",
            "2",
            "--lambdas",
            "0,0.2,2",
            "--embedding-cache",
            str(embedding_cache_path),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| router |" in printed and "APGR" in printed
    data = json.loads((out / "results.json").read_text())
    assert data["n_evaluated"] == 80 and data["config"]["seeds"] == [0, 1]
    assert 0 < data["methods"]["router"]["accuracy"]["mean"] <= 1
    assert len(data["sweep"]["router"]) == 3 and len(data["cumulative_reward"]["router"]) == 80
    for png in ("accuracy_vs_cost.png", "cumulative_reward.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.md").read_text() in printed

    bad = tmp_path / "bad.jsonl"
    bad.write_text(outcomes.read_text().splitlines()[0] + "\n{not json\n")
    assert main(["bench", str(bad), "--quiet"]) == 2
    assert "line 2" in capsys.readouterr().err


@pytest.mark.integration
def test_evaluate_from_db(engine, pg_schema, tmp_path: Path, monkeypatch, capsys) -> None:
    """Decisions logged by a uniform policy over two arms: 'big' is right 90 % of the time at
    $0.001, 'small' 50 % at $0.0001. The estimates recover each arm's value at two λ."""
    from evaluation.ope import load_decisions
    from service import storage

    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        arm = "big" if rng.random() < 0.5 else "small"
        correct = bool(rng.random() < (0.9 if arm == "big" else 0.5))
        cost = 0.001 if arm == "big" else 0.0001
        rows.append(
            {
                "query_id": f"q{i}",
                "task": "yes_no",
                "text": f"question {i}",
                "options": ["yes", "no"],
                "embedding_model": "test",
                "arm": arm,
                "propensity": 0.5,
                "probabilities": {"small": 0.5, "big": 0.5},
                "policy": "uniform",
                "status": "ok",
                "prediction": "yes" if correct else "no",
                "cost_usd": cost,
                "context": storage.vector_to_bytes(rng.normal(size=4)),
                "label": "yes",
                "correct": correct,
                "reward": correct - 0.1 * cost / 0.001,
                "reward_lambda": 0.1,
                "decided_at": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
            }
        )
    rows.append(
        {**rows[0], "query_id": "unlabeled", "label": None, "correct": None, "reward": None}
    )
    rows.append(
        {
            **rows[1],
            "query_id": "failed",
            "status": "llm_error",
            "prediction": None,
            "correct": None,
            "label": None,
            "reward": 0.0,
            "cost_usd": 0.0,
        }
    )
    with engine.begin() as conn:
        conn.execute(sa.insert(storage.decisions), rows)

    data = load_decisions(engine)
    assert data.n == 401 and "unlabeled" not in data.query_ids  # the failure counts, as wrong
    assert not data.correct[data.query_ids.index("failed")]

    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("METALLM_DATABASE_SCHEMA", pg_schema)
    out = tmp_path / "ope.json"
    args = ["evaluate", "--from-db", "--lambda", "0", "--lambda", "0.5", "--json", str(out)]
    assert main(args) == 0
    assert "off-policy estimates" in capsys.readouterr().out
    results = {(r["target"], r["lambda"]): r for r in json.loads(out.read_text())}
    assert set(results) == {
        (t, lam)
        for t in ("logged", "uniform", "arm:small", "arm:big", "greedy")
        for lam in (0, 0.5)
    }
    for (target, lam), r in results.items():
        for key in ("ips", "snips", "dr"):
            assert r[key]["low"] <= r[key]["value"] <= r[key]["high"]
        if target == "arm:big":
            truth = 0.9 - lam * 1.0
            assert r["dr"]["low"] - 0.02 <= truth <= r["dr"]["high"] + 0.02
        if target == "logged":
            assert r["ips"]["value"] == pytest.approx(r["observed_mean_reward"])
    # at λ = 0.5 the small arm is worth more than the big one
    assert results[("arm:small", 0.5)]["dr"]["value"] > results[("arm:big", 0.5)]["dr"]["value"]
    assert main(["evaluate"]) == 2
