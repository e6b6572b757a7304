"""The demo's task label sets have one home, and the example config agrees with it."""

from __future__ import annotations

from pathlib import Path

from producers.demo_data import DATASET, TASKS, demo_rows
from service.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_example_config_has_the_demo_tasks_and_labels():
    config = load_config(ROOT / "config" / "metallm.example.yaml")
    assert set(config.tasks) == set(TASKS)
    for name, task in TASKS.items():
        assert config.tasks[name].kind == task["kind"]
        assert list(config.tasks[name].labels) == task["labels"]


def test_every_demo_query_is_labeled_within_its_task():
    rows = demo_rows()
    assert len(rows) == len(DATASET.read_text().splitlines()) == 320
    assert demo_rows(5) == rows[:5]
    for row in rows:
        assert row["label"] in TASKS[row["task"]]["labels"], row
