"""Streamed calls through the gateway against a real local OpenAI-compatible arm server (SSE
chunks, as OpenAI's): retries and fallback before the first token, neither after it, and a
classification prompt never streamed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from service.config import TaskConfig, parse_config
from service.llm.base import CallRequest
from service.llm.gateway import CallResult, Gateway
from service.llm.streaming import Relay
from service.tasks import build_prompt
from tests.faults.harness import TASKS, ArmServer, arm_config, make_queries

QUERIES = make_queries(4, prefix="q-stream")
CHAT = TaskConfig(kind="open")


@pytest.fixture(scope="module")
def arms() -> Iterator[ArmServer]:
    with ArmServer({q.query_id: q for q in QUERIES}, {"first": 0.5, "second": 0.5}) as server:
        yield server


def call(arms: ArmServer, q, task: TaskConfig = CHAT) -> tuple[CallResult, list[str]]:
    """One call of arm ``first`` (one retry, ``second`` its fallback), streamed to a relay."""
    doc = arm_config(
        arms,
        {"first": (1.0, 2.0), "second": (1.0, 2.0)},
        fallback={"first": "second"},
        first={"max_retries": 1, "retry_backoff_seconds": 0.01},
    )
    gateway = Gateway(parse_config({**doc, "tasks": {**TASKS, "chat": {"kind": "open"}}}))
    prompt = build_prompt(task, q.text, task.labels)
    got: list[str] = []

    async def run() -> CallResult:
        try:
            return await gateway.call("first", CallRequest(q.query_id, prompt), Relay(got.append))
        finally:
            await gateway.aclose()

    return asyncio.run(run()), got


def test_a_failure_after_the_first_token_is_neither_retried_nor_sent_to_the_fallback(arms):
    q = QUERIES[0]
    arms.answers[q.query_id] = "red green blue cyan"
    arms.break_ids.add(q.query_id)
    result, got = call(arms, q)
    assert got == ["red ", "green "]
    assert (result.status, result.fallback_arm, result.attempts) == ("llm_error", None, 1)
    assert "the stream broke after its first tokens" in (result.error or "")
    assert arms.calls_by_query()[q.query_id] == 1


def test_before_the_first_token_the_arm_is_retried_then_the_fallback_streams(arms):
    q = QUERIES[1]
    arms.answers[q.query_id] = "from the fallback"
    arms.modes["first"] = "error"
    try:
        result, got = call(arms, q)
    finally:
        arms.modes["first"] = "ok"
    assert got == ["from ", "the ", "fallback"]
    assert (result.status, result.fallback_arm, result.attempts) == ("ok", "second", 3)
    assert result.raw_output == "from the fallback" and result.output_tokens == 3
    assert [c.arm for c in arms.calls if c.query_id == q.query_id] == ["first", "first", "second"]


def test_a_classification_answer_is_not_streamed(arms):
    q = QUERIES[2]
    sentiment = TaskConfig(kind="classification", labels=["positive", "negative"])
    result, got = call(arms, q, sentiment)
    assert got == [] and result.status == "ok" and result.prediction in sentiment.labels
