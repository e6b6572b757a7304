"""The demo's labeled queries and its three tasks' label sets, in one place.

``producers/data/demo_queries.jsonl`` holds 320 BIG-bench queries (sentiment, intent, yes/no),
one JSON object per line: ``query_id, text, task, label``. :data:`TASKS` gives each task's kind
and labels as ``tasks:`` entries of a config (``config/metallm.example.yaml`` adds an
instruction per task; a test keeps the two in step). The demo, the tests and the benchmarks
read both from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATASET = Path(__file__).parent / "data" / "demo_queries.jsonl"

INTENTS = [
    "add_to_playlist",
    "book_restaurant",
    "get_weather",
    "play_music",
    "search_screening_event",
    "search_creative_work",
    "rate_book",
]
TASKS: dict[str, dict[str, Any]] = {
    "sentiment": {"kind": "classification", "labels": ["positive", "negative"]},
    "intent": {"kind": "classification", "labels": INTENTS},
    "yes_no": {"kind": "classification", "labels": ["yes", "no"]},
}


def demo_rows(n: int | None = None) -> list[dict[str, Any]]:
    """The first ``n`` labeled queries (all of them by default), as dicts."""
    rows = [json.loads(line) for line in DATASET.read_text().splitlines()]
    return rows if n is None else rows[:n]
