"""The ``openai`` adapter reads the response body itself (not the SDK's typed models): what
it makes of bodies a real server could send — well formed, without usage, with a null
content, not JSON, JSON but not a completion, or echoing the API key — through the real SDK
against a local HTTP server. (The real llama_cpp.server tests cover real replies.)"""

from __future__ import annotations

import asyncio

import pytest

from service.config import TaskConfig, parse_config
from service.llm.base import CallRequest
from service.llm.gateway import Gateway
from service.tasks import build_prompt
from tests.llm.wire import WireServer

pytest.importorskip("openai")

TASK = TaskConfig(kind="classification", labels=["positive", "negative"])
KEY = "sk-test-5d1e0f9a2b7c4e88"


def completion(content: str | None, usage: dict | None = None) -> dict:
    body: dict = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def call(reply, monkeypatch, **arm):
    monkeypatch.setenv("TEST_OPENAI_KEY", KEY)
    with WireServer(lambda r: reply) as server:
        config = {
            "name": "m",
            "provider": "openai",
            "model": "m",
            "base_url": f"{server.url}/v1",
            "api_key_env": "TEST_OPENAI_KEY",
            "input_price_per_1m": 1.0,
            "output_price_per_1m": 2.0,
            "max_retries": 2,
            "retry_backoff_seconds": 0.01,
            **arm,
        }
        gateway = Gateway(parse_config({"tasks": {"s": TASK.model_dump()}, "arms": [config]}))

        async def run():
            request = CallRequest("q1", build_prompt(TASK, "A fine film.", TASK.labels))
            try:
                return await gateway.call("m", request)
            finally:
                await gateway.aclose()

        result = asyncio.run(run())
    return result, server.requests


def test_a_completion_gives_the_label_tokens_and_cost(monkeypatch):
    body = completion(" Positive\n", {"prompt_tokens": 40, "completion_tokens": 2})
    result, (sent,) = call((200, {"content-type": "application/json"}, body), monkeypatch)
    assert (result.status, result.prediction, result.raw_output) == ("ok", "positive", "Positive")
    assert (result.input_tokens, result.output_tokens) == (40, 2)
    assert result.cost_usd == pytest.approx((40 * 1.0 + 2 * 2.0) / 1e6)
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert (sent.body["model"], sent.body["temperature"]) == ("m", 0.0)
    assert "A fine film." in sent.body["messages"][0]["content"]


def test_the_completions_api_reads_the_choice_text(monkeypatch):
    body = {"choices": [{"index": 0, "text": " negative"}], "usage": {"prompt_tokens": 30}}
    reply = (200, {"content-type": "application/json"}, body)
    result, (sent,) = call(reply, monkeypatch, api="completions")
    assert (result.status, result.prediction) == ("ok", "negative")
    assert (result.input_tokens, result.output_tokens) == (30, 0)
    assert sent.path == "/v1/completions" and "A fine film." in sent.body["prompt"]


def test_score_mode_reads_first_token_logprobs_of_both_apis(monkeypatch):
    chat = completion("Neg", {"prompt_tokens": 40, "completion_tokens": 1})
    chat["choices"][0]["logprobs"] = {
        "content": [
            {
                "token": "Neg",
                "logprob": -0.2,
                "top_logprobs": [
                    {"token": "Neg", "logprob": -0.2},
                    {"token": " positive", "logprob": -1.9},
                ],
            }
        ]
    }
    reply = (200, {"content-type": "application/json"}, chat)
    result, (sent,) = call(reply, monkeypatch, answer_mode="score")
    assert (result.status, result.prediction) == ("ok", "negative")
    assert (sent.body["logprobs"], sent.body["top_logprobs"], sent.body["max_tokens"]) == (
        True,
        20,
        1,
    )

    text = {
        "choices": [{"text": " pos", "logprobs": {"top_logprobs": [{" pos": -0.1, " neg": -2.4}]}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 1},
    }
    reply = (200, {"content-type": "application/json"}, text)
    result, (sent,) = call(reply, monkeypatch, api="completions", answer_mode="score")
    assert (result.status, result.prediction) == ("ok", "positive")
    assert sent.body["logprobs"] == 20


def test_no_usage_costs_nothing_and_null_content_is_a_parse_error(monkeypatch):
    result, _ = call((200, {"content-type": "application/json"}, completion(None)), monkeypatch)
    assert (result.status, result.prediction, result.raw_output) == ("parse_error", None, "")
    assert (result.input_tokens, result.output_tokens, result.cost_usd) == (0, 0, 0.0)


@pytest.mark.parametrize(
    "body",
    [
        b"<html>\x00\xff not JSON",
        {"error": "no choices here"},
        {"choices": []},
        [1, 2, 3],
        {"choices": [{"message": "Positive"}]},
        {"choices": [{"message": {"content": "Positive"}}], "usage": {"prompt_tokens": "x"}},
    ],
)
def test_a_body_that_is_not_a_completion_fails_the_call_once(monkeypatch, body):
    result, sent = call((200, {"content-type": "application/json"}, body), monkeypatch)
    assert result.status == "llm_error" and result.prediction is None
    assert result.error.startswith("openai: the response is not a completion:")
    assert (result.attempts, len(sent)) == (1, 1)  # the server answered: not retried


@pytest.mark.parametrize("before", [10, 180])  # the key whole in what is shown, or cut by it
def test_a_body_echoing_the_key_is_shown_redacted(monkeypatch, before):
    body = f'{{"detail": "{"x" * before} {KEY} was refused"}}'.encode()
    result, _ = call((200, {"content-type": "application/json"}, body), monkeypatch)
    assert KEY[:8] not in result.error and "***" in result.error
