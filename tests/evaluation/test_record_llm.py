"""Record → bench round trip with real local arms (Gemma-3-270M through llama.cpp)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from app.cli import main
from service.outcomes import read_outcomes
from tests.helpers import TASKS, demo_rows

pytestmark = pytest.mark.llm

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make install`")


def test_record_then_bench_with_a_real_local_model(
    tmp_path: Path, cached_embedder, embedding_cache_path, capsys
) -> None:
    rows = [r for r in demo_rows() if r["task"] in ("sentiment", "yes_no")][:6]
    dataset = tmp_path / "data.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gemma = {"provider": "llamacpp", "model": "gemma-3-270m", "n_threads": 1}
    config = tmp_path / "metallm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tasks": {t: TASKS[t] for t in ("sentiment", "yes_no")},
                "arms": [  # one model, two ways of answering, priced differently
                    {"name": "gen", **gemma, "input_price_per_1m": 0.05,
                     "output_price_per_1m": 0.1},
                    {"name": "score", **gemma, "answer_mode": "score",
                     "input_price_per_1m": 1.0, "output_price_per_1m": 1.0},
                ],
            }
        )
    )  # fmt: skip
    out = tmp_path / "outcomes.jsonl"
    assert (
        main(["record", str(dataset), "--config", str(config), "--out", str(out), "--quiet"]) == 0
    )
    records = read_outcomes(out)
    assert [r.query_id for r in records] == [r["query_id"] for r in rows]
    for r in records:
        for arm, outcome in r.arms.items():
            assert outcome.prediction in r.options, (arm, outcome)  # constrained to the labels
            assert outcome.input_tokens > 0 and outcome.cost_usd > 0
        # the score arm is priced higher per token: it costs more on every query
        assert r.arms["score"].cost_usd > r.arms["gen"].cost_usd
    capsys.readouterr()

    cached_embedder.embed([r.text for r in records])
    bench_out = tmp_path / "bench"
    args = ["bench", str(out), "--delay", "2", "--lambdas", "0,5", "--seeds", "2", "--quiet"]
    args += ["--embedding-cache", str(embedding_cache_path), "--out", str(bench_out)]
    assert main(args) == 0
    result = json.loads((bench_out / "results.json").read_text())
    for arm in ("gen", "score"):
        expected = sum(r.correct(arm) for r in records) / len(records)
        assert result["methods"][f"arm: {arm}"]["accuracy"]["mean"] == pytest.approx(expected)
        spent = sum(r.cost(arm) for r in records)
        assert result["methods"][f"arm: {arm}"]["total_cost"]["mean"] == pytest.approx(spent)
    assert result["n_evaluated"] == 6 and len(result["sweep"]["router"]) == 2
