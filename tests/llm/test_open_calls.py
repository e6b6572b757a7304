"""Open-ended calls through every HTTP provider's real SDK against a local wire server: the
prompt goes as it is, with the call's ``max_tokens`` and ``temperature``, never under an answer
grammar nor scored (an ``answer_mode: score`` arm generates for an open task), and the text
comes back as the answer (``prediction`` None, ``status`` ok). A classification call with its
own ``max_tokens`` keeps its grammar and gets that limit."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from service.config import TaskConfig, parse_config
from service.llm.base import CallRequest
from service.llm.gateway import Gateway
from service.tasks import build_prompt
from tests.llm.test_contract_anthropic_bedrock import anthropic_arm, bedrock_arm
from tests.llm.test_openai_bodies import completion
from tests.llm.wire import WireServer, recorded

pytest.importorskip("openai")

OPEN = TaskConfig(kind="open", max_output_tokens=300, temperature=0.7)
SENTIMENT = TaskConfig(kind="classification", labels=["positive", "negative"])
HAIKU = "Rain on the tin roof\nthe kettle hums its answer\nnobody replies"


def run(arm: dict, task: TaskConfig = OPEN, reply=None, max_tokens=None, temperature=None):
    """One call of ``arm`` on a wire server answering ``reply``: (result, the request sent)."""
    reply = reply or (200, {}, completion(HAIKU, {"prompt_tokens": 9, "completion_tokens": 17}))
    with WireServer(lambda r: reply) as server:
        arm = {**arm, "base_url": arm.get("base_url", "{url}").format(url=server.url)}
        tasks = {"t": task.model_dump(exclude_none=True)}
        gateway = Gateway(parse_config({"tasks": tasks, "arms": [{"max_retries": 0, **arm}]}))
        prompt = build_prompt(task, "Write a haiku about rain.", task.labels)
        request = CallRequest(
            "q1",
            prompt,
            task.output_tokens if max_tokens is None else max_tokens,
            task.temperature if temperature is None else temperature,
        )

        async def call():
            try:
                return await gateway.call(arm["name"], request)
            finally:
                await gateway.aclose()

        result = asyncio.run(call())
        gateway.close()
    (sent,) = server.requests
    return result, sent


OPENAI = {"name": "m", "provider": "openai", "model": "m", "base_url": "{url}/v1"}


@pytest.mark.parametrize("extra", [{"constrain": "gbnf"}, {"answer_mode": "score"}])
def test_an_openai_arm_generates_an_open_answer_freely(extra):
    result, sent = run({**OPENAI, "output_price_per_1m": 1.0, **extra})
    assert (result.status, result.prediction, result.raw_output) == ("ok", None, HAIKU)
    assert result.answer_scores is None and result.cost_usd == pytest.approx(17 / 1e6)
    assert sent.body["messages"] == [{"role": "user", "content": "Write a haiku about rain."}]
    assert (sent.body["max_tokens"], sent.body["temperature"]) == (300, 0.7)
    assert not {"grammar", "logprobs", "top_logprobs"} & set(sent.body)


def test_a_classification_call_keeps_its_grammar_and_takes_the_calls_limit():
    reply = (200, {}, completion("positive"))
    result, sent = run(
        {**OPENAI, "constrain": "gbnf"}, SENTIMENT, reply, max_tokens=3, temperature=0.2
    )
    assert (result.status, result.prediction) == ("ok", "positive")
    assert "grammar" in sent.body
    assert (sent.body["max_tokens"], sent.body["temperature"]) == (3, 0.2)
    # without a per-call limit, the arm's own
    _, sent = run({**OPENAI, "max_output_tokens": 6}, SENTIMENT, reply)
    assert (sent.body["max_tokens"], sent.body["temperature"]) == (6, 0.0)


def test_an_anthropic_arm_takes_the_calls_limit_and_temperature(monkeypatch):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-test-0123456789abcdef")
    arm = anthropic_arm("{url}")
    result, sent = run(arm, reply=recorded("anthropic_message_200"))
    assert (sent.body["max_tokens"], sent.body["temperature"]) == (300, 0.7)
    assert (result.status, result.prediction, result.raw_output) == ("ok", None, "negative")
    # a call that sets no temperature sends none: the model's own
    _, sent = run(arm, SENTIMENT, recorded("anthropic_message_200"))
    assert sent.body["max_tokens"] == 5 and "temperature" not in sent.body


def test_a_bedrock_arm_takes_the_calls_limit_and_temperature(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE0TESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    pytest.importorskip("boto3")
    result, sent = run(bedrock_arm("{url}"), reply=recorded("bedrock_converse_200"))
    assert sent.body["inferenceConfig"] == {"maxTokens": 300, "temperature": 0.7}
    assert (result.status, result.prediction) == ("ok", None)


def test_a_replay_arm_answers_an_open_task_with_its_recording(tmp_path: Path):
    outcomes = tmp_path / "outcomes.jsonl"
    arms = {"m": {"prediction": HAIKU, "cost_usd": 0.002}, "n": {"prediction": "", "cost_usd": 0}}
    record = {"query_id": "q1", "task": "t", "text": "rain", "label": "x", "arms": arms}
    outcomes.write_text(json.dumps(record) + "\n")
    config = parse_config(
        {
            "tasks": {"t": {"kind": "open"}},
            "arms": [{"name": "m", "provider": "replay", "model": "m", "outcomes": str(outcomes)}],
        }
    )
    gateway = Gateway(config)
    prompt = build_prompt(config.tasks["t"], "Write a haiku about rain.", [])
    result = asyncio.run(gateway.call("m", CallRequest("q1", prompt, 300, 0.7)))
    assert (result.status, result.prediction, result.raw_output) == ("ok", None, HAIKU)
    assert result.cost_usd == 0.002
