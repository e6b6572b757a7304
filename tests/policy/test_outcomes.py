"""Outcomes reader/writer: the real gsm8k file, and rejection of malformed lines."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from service.outcomes import OutcomesError, dumps_outcomes, read_outcomes

DATA = Path(__file__).parent / "data" / "gsm8k_outcomes.jsonl"

GOOD = {
    "query_id": "q1",
    "text": "2+2?",
    "label": "4",
    "arms": {
        "big": {"prediction": "4", "cost_usd": 0.01},
        "small": {"prediction": "5", "cost_usd": 0},
    },
}


def _lines(*objs) -> io.StringIO:
    return io.StringIO("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))


def test_reads_the_gsm8k_file_with_its_documented_figures() -> None:
    records = read_outcomes(DATA)
    assert len(records) == 1319
    gpt4, mixtral = "gpt-4-1106-preview", "mixtral-8x7b-instruct"
    acc = {a: sum(r.correct(a) for r in records) / len(records) for a in (gpt4, mixtral)}
    assert acc[gpt4] == pytest.approx(0.8567, abs=1e-4)
    assert acc[mixtral] == pytest.approx(0.6384, abs=1e-4)
    assert sum(r.cost(gpt4) for r in records) == pytest.approx(0.994, abs=1e-3)
    oracle = sum(r.correct(gpt4) or r.correct(mixtral) for r in records) / len(records)
    assert oracle == pytest.approx(0.9287, abs=1e-4)


def test_write_then_read_round_trips() -> None:
    records = read_outcomes(DATA)[:50]
    again = read_outcomes(io.StringIO(dumps_outcomes(records)))
    assert again == records


def test_failed_call_counts_as_wrong_and_extras_are_kept() -> None:
    obj = json.loads(json.dumps(GOOD))
    obj["arms"]["small"] = {"prediction": None, "cost_usd": 0.0, "latency_ms": 12, "vendor": "x"}
    [record] = read_outcomes(_lines(obj))
    assert record.correct("big") and not record.correct("small")
    assert record.arms["small"].model_extra == {"vendor": "x"}


def _bad(mutate) -> dict:
    obj = json.loads(json.dumps(GOOD))
    mutate(obj)
    return obj


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("", "blank line"),
        (_bad(lambda o: o.pop("label")), "label"),
        (_bad(lambda o: o["arms"].pop("small")), "arms"),
        (_bad(lambda o: o["arms"]["big"].update(cost_usd=-1)), "cost_usd"),
        (_bad(lambda o: o["arms"]["big"].update(cost_usd="0.1")), "cost_usd"),
        (_bad(lambda o: o["arms"]["big"].pop("prediction")), "prediction"),
        (_bad(lambda o: o["arms"]["big"].update(prediction=4)), "prediction"),
        (_bad(lambda o: o.update(query_id="")), "query_id"),
    ],
)
def test_malformed_line_is_rejected_with_its_number(line, reason: str) -> None:
    with pytest.raises(OutcomesError) as info:
        read_outcomes(_lines(GOOD | {"query_id": "q0"}, line))
    assert info.value.line == 2
    assert reason in str(info.value)


def test_duplicate_query_id_is_rejected() -> None:
    with pytest.raises(OutcomesError, match="line 3: duplicate query_id 'q1'"):
        read_outcomes(_lines(GOOD, GOOD | {"query_id": "q2"}, GOOD))
