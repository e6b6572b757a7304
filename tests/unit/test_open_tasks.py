"""Open tasks in the config, their prompts and context-window check, and label events with a
score: what is accepted, and what is refused with the bad key or the reason."""

from __future__ import annotations

import pytest

from service.config import OPEN_MAX_OUTPUT_TOKENS, ConfigError, parse_config
from service.events import InvalidEvent, LabelEvent
from service.query_checks import offered_arms, too_long_reason
from service.tasks import build_prompt

ARM = {"name": "a", "provider": "openai", "model": "m"}


def config(task: dict, **arm) -> dict:
    return {"tasks": {"t": task}, "arms": [{**ARM, **arm}]}


@pytest.mark.parametrize(
    ("task", "reason"),
    [
        ({"kind": "open", "labels": ["a", "b"]}, "an open task has no labels"),
        ({"kind": "classification"}, "a classification task needs its labels"),
        (
            {"kind": "classification", "labels": ["a", "b"], "max_output_tokens": 50},
            "max_output_tokens: for open tasks only",
        ),
        (
            {"kind": "multiple_choice", "labels": ["a", "b"], "check": {"kind": "exact"}},
            "check: for open tasks only",
        ),
        ({"kind": "open", "max_output_tokens": 0}, "greater than or equal to 1"),
        ({"kind": "open", "temperature": 3}, "less than or equal to 2"),
        ({"kind": "open", "check": {"kind": "regex"}}, "a regex check needs 'pattern'"),
        ({"kind": "open", "check": {"kind": "regex", "pattern": "("}}, "not a regular expression"),
        ({"kind": "open", "check": {"kind": "exact", "pattern": "x"}}, "'pattern' is for regex"),
        ({"kind": "open", "check": {"kind": "fuzzy"}}, "tasks.t.check.kind"),
        ({"kind": "open", "template": "no text"}, "{text} placeholder"),
    ],
)
def test_bad_open_task_fields_are_refused_with_the_reason(task, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(config(task), source="x.yaml")
    assert "tasks.t" in str(info.value) and reason in str(info.value)


def test_an_open_task_takes_its_own_limit_and_serves_score_arms():
    """A score-mode arm serves an open task by generating (documented): the config is valid."""
    parsed = parse_config(config({"kind": "open"}, answer_mode="score"))
    task = parsed.tasks["t"]
    assert (task.labels, task.output_tokens, task.temperature) == ([], OPEN_MAX_OUTPUT_TOKENS, None)
    assert (
        parse_config(config({"kind": "open", "max_output_tokens": 64})).tasks["t"].output_tokens
        == 64
    )
    classification = parse_config(config({"kind": "classification", "labels": ["a", "b"]}))
    assert classification.tasks["t"].output_tokens is None  # each arm's own


def test_the_context_window_check_counts_an_open_tasks_output_limit():
    """A prompt of ~100 tokens fits a 600-token window with a label's 8 tokens, not with an open
    answer's 512: the open query is offered the unlimited arm only, and refused when there is
    none."""
    parsed = parse_config(
        {
            "tasks": {"chat": {"kind": "open"}},
            "arms": [
                {**ARM, "name": "small", "context_tokens": 600},
                {**ARM, "name": "big"},
            ],
        }
    )
    prompt = build_prompt(parsed.tasks["chat"], "x" * 400, []).text
    limit = parsed.tasks["chat"].output_tokens
    assert offered_arms(parsed, ["small", "big"], [prompt, prompt], [None, limit]) == [
        ("small", "big"),
        ("big",),
    ]
    only_small = parse_config(
        {"tasks": {"chat": {"kind": "open"}}, "arms": [{**ARM, "context_tokens": 600}]}
    )
    assert too_long_reason(only_small, prompt) is None
    assert too_long_reason(only_small, prompt, limit).startswith("text too long")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"query_id": "q", "score": -0.1}', "score: Input should be greater than or equal to 0"),
        (b'{"query_id": "q", "score": "0.5"}', "score: Input should be a valid number"),
        (b'{"query_id": "q", "score": true}', "score: Input should be a valid number"),
        (b'{"query_id": "q"}', "label: Field required"),
        (b'{"query_id": "q", "label": "a", "score": 0.5}', "exactly one of label and score"),
    ],
)
def test_a_label_event_has_a_label_or_a_score_in_0_1(body, reason):
    with pytest.raises(InvalidEvent, match=reason):
        LabelEvent.from_bytes(body)
    assert LabelEvent.from_bytes(b'{"query_id": "q", "score": 1}').score == 1.0
    assert LabelEvent.from_bytes(b'{"query_id": "q", "label": "a"}').score is None


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ({"baseline": "nope"}, "task 't': baseline 'nope' is not an arm"),
        ({"baseline": "a", "tolerance": 1}, "tasks.t.tolerance: Input should be less than 1"),
        ({"baseline": "a", "tolerance": -0.1}, "tasks.t.tolerance: Input should be greater"),
        ({"tolerance": 0.1}, "tolerance is conservative mode's: it needs a baseline arm"),
    ],
)
def test_bad_conservative_mode_keys_are_refused_with_the_reason(keys, reason):
    task = {"kind": "classification", "labels": ["a", "b"], **keys}
    with pytest.raises(ConfigError) as info:
        parse_config(config(task), source="x.yaml")
    assert reason in str(info.value)
