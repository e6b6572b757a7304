"""``metallm record``: every arm on every query, outcomes that read back, resuming after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.record import (
    RecordError,
    builtin_dataset,
    load_dataset,
    record,
    recording_config,
)
from service.config import parse_config
from service.outcomes import read_outcomes
from tests.helpers import TASKS, demo_rows, replay_config, write_outcomes

ARMS = {"small": (0.6, 0.00001), "big": (0.9, 0.001)}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """What the replay arms will answer: recorded outcomes of the built-in queries."""
    return write_outcomes(tmp_path / "source.jsonl", demo_rows(), ARMS)


def strip_timing(records):
    return [
        {
            **r.model_dump(),
            "arms": {a: {**o.model_dump(), "latency_ms": None} for a, o in r.arms.items()},
        }
        for r in records
    ]


def test_builtin_dataset_is_the_demo_set() -> None:
    dataset = load_dataset(builtin_dataset())
    assert len(dataset) == 320
    assert {q.task for q in dataset} == {"sentiment", "intent", "yes_no"}
    assert all(q.label for q in dataset)


def test_every_arm_answers_every_query(tmp_path: Path, source: Path) -> None:
    dataset = load_dataset(builtin_dataset())[:30]
    out = tmp_path / "out.jsonl"
    summary = record(dataset, replay_config(source, list(ARMS)), out, progress=False)
    assert (summary.written, summary.resumed_from) == (30, 0)
    recorded = read_outcomes(out)
    truth = {r.query_id: r for r in read_outcomes(source)}
    assert [r.query_id for r in recorded] == [q.query_id for q in dataset]
    for r in recorded:
        assert r.label == truth[r.query_id].label
        assert r.options == TASKS[r.task]["labels"]
        for arm in ARMS:
            assert r.arms[arm].prediction == truth[r.query_id].arms[arm].prediction
            assert r.arms[arm].cost_usd == pytest.approx(ARMS[arm][1])
    assert summary.per_arm["big"]["accuracy"] == pytest.approx(
        sum(r.correct("big") for r in recorded) / 30
    )


def test_failed_and_unparseable_answers(tmp_path: Path) -> None:
    rows = [r for r in demo_rows() if r["task"] == "yes_no"][:3]
    lines = []
    for row, small in zip(rows, ["yes", None, "maybe later"], strict=True):
        arms = {
            "small": {"prediction": small, "cost_usd": 0.0001},
            "big": {"prediction": row["label"], "cost_usd": 0.001},
        }
        lines.append(json.dumps({**row, "arms": arms}))
    source = tmp_path / "s.jsonl"
    source.write_text("\n".join(lines) + "\n")
    dataset = [
        q for q in load_dataset(builtin_dataset()) if q.query_id in {r["query_id"] for r in rows}
    ]
    dataset.sort(key=lambda q: [r["query_id"] for r in rows].index(q.query_id))
    out = tmp_path / "out.jsonl"
    record(dataset, replay_config(source, ["small", "big"]), out, progress=False)
    ok, failed, garbled = (r.arms["small"] for r in read_outcomes(out))
    assert (ok.prediction, ok.status) == ("yes", "ok")
    assert (failed.prediction, failed.status) == (None, "llm_error") and failed.error
    # the raw answer is kept as the prediction: it is not a label, so it is simply wrong
    assert (garbled.prediction, garbled.status) == ("maybe later", "parse_error")


def test_resumes_after_an_interruption(tmp_path: Path, source: Path) -> None:
    dataset = load_dataset(builtin_dataset())[:20]
    config = replay_config(source, list(ARMS))
    whole = tmp_path / "whole.jsonl"
    record(dataset, config, whole, progress=False)

    out = tmp_path / "out.jsonl"

    def crash_after_7(i: int) -> None:
        if i == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record(dataset, config, out, concurrency=4, progress=False, on_line=crash_after_7)
    assert len(out.read_text().splitlines()) == 7
    with out.open("a") as fh:  # killed in the middle of writing line 8
        fh.write('{"query_id": "' + dataset[7].query_id + '", "te')
    summary = record(dataset, config, out, progress=False)
    assert (summary.resumed_from, summary.written) == (7, 13)
    assert strip_timing(read_outcomes(out)) == strip_timing(read_outcomes(whole))
    again = record(dataset, config, out, progress=False)  # nothing left to do
    assert (again.resumed_from, again.written) == (20, 0)


def test_refuses_to_resume_a_different_run(tmp_path: Path, source: Path) -> None:
    dataset = load_dataset(builtin_dataset())[:6]
    out = tmp_path / "out.jsonl"
    record(dataset, replay_config(source, list(ARMS)), out, progress=False)
    with pytest.raises(RecordError, match="not a partial run"):
        record(dataset[1:], replay_config(source, list(ARMS)), out, progress=False)
    other = write_outcomes(tmp_path / "other.jsonl", demo_rows(), {"small": (0.5, 0), "x": (1, 0)})
    with pytest.raises(RecordError, match="arms"):
        record(dataset, replay_config(other, ["small", "x"]), out, progress=False)
    out.write_text(out.read_text() + "{broken\n")
    with pytest.raises(RecordError, match="line 7"):
        record(dataset, replay_config(source, list(ARMS)), out, progress=False)
    summary = record(
        dataset, replay_config(source, list(ARMS)), out, overwrite=True, progress=False
    )
    assert summary.written == 6 and len(read_outcomes(out)) == 6


def test_checks_tasks_arms_and_labels_before_calling(tmp_path: Path, source: Path) -> None:
    dataset = load_dataset(builtin_dataset())[:5]
    one_task = parse_config(
        {
            "tasks": {"sentiment": TASKS["sentiment"]},
            "arms": [
                {"name": a, "provider": "replay", "model": a, "outcomes": str(source)} for a in ARMS
            ],
        }
    )
    with pytest.raises(RecordError, match="tasks not in the config: "):
        record(dataset, one_task, tmp_path / "o.jsonl", progress=False)
    one_arm = replay_config(source, ["small"])
    with pytest.raises(RecordError, match="at least 2 arms"):
        record(dataset, one_arm, tmp_path / "o.jsonl", progress=False)
    assert not (tmp_path / "o.jsonl").exists()
    unlabeled = tmp_path / "u.jsonl"
    unlabeled.write_text(json.dumps({"query_id": "a", "text": "t", "task": "yes_no"}) + "\n")
    with pytest.raises(RecordError, match="no label"):
        load_dataset(unlabeled)


def test_recording_config_turns_off_fallbacks_and_breakers(source: Path) -> None:
    config = parse_config(
        {
            "tasks": TASKS,
            "arms": [
                {
                    "name": a,
                    "provider": "replay",
                    "model": a,
                    "outcomes": str(source),
                    "fallback": "big" if a == "small" else None,
                }
                for a in ARMS
            ],
            "gateway": {"fallback_arm": "small"},
        }
    )
    rec = recording_config(config)
    assert rec.gateway.fallback_arm is None
    assert all(a.fallback is None and a.breaker_failures >= 10**9 for a in rec.arms)
    assert config.arm("small").fallback == "big"  # the original is untouched
