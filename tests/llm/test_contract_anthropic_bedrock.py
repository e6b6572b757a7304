"""Contract tests: the anthropic and bedrock adapters, through the real SDKs (anthropic,
boto3), against a local server speaking each provider's wire format with recorded bodies
(see tests/llm/recorded/README.md). They pin what goes over the wire and how replies, usage
and errors map to results; they cannot prove the real services still answer this way."""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

import pytest

from service.config import ArmError, TaskConfig, parse_config
from service.llm.base import CallRequest
from service.llm.gateway import Gateway
from service.tasks import build_prompt
from tests.llm.wire import WireServer, recorded

pytest.importorskip("anthropic")
pytest.importorskip("boto3")

TASK = TaskConfig(kind="classification", labels=["positive", "negative"])
KEY = "sk-ant-test-0123456789abcdef"


def request(qid: str = "q1") -> CallRequest:
    return CallRequest(qid, build_prompt(TASK, "The film dragged on forever.", TASK.labels))


def gateway(arm: dict) -> Gateway:
    base = {"retry_backoff_seconds": 0.01, "retry_backoff_max_seconds": 0.05, "max_retries": 2}
    return Gateway(parse_config({"tasks": {"s": TASK.model_dump()}, "arms": [{**base, **arm}]}))


# ---------------------------------------------------------------------------------- anthropic
def anthropic_arm(url: str) -> dict:
    return {
        "name": "claude",
        "provider": "anthropic",
        "model": "claude-haiku-4-5",
        "base_url": url,
        "api_key_env": "TEST_ANTHROPIC_KEY",
        "input_price_per_1m": 1.0,
        "output_price_per_1m": 5.0,
        "max_output_tokens": 5,
    }


def test_anthropic_messages_request_and_reply(monkeypatch):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", KEY)
    with WireServer(lambda r: recorded("anthropic_message_200")) as server:
        result = asyncio.run(gateway(anthropic_arm(server.url)).call("claude", request()))
    (sent,) = server.requests
    assert sent.path == "/v1/messages"
    # the key from the named variable, as x-api-key (older SDKs) or a bearer token (newer)
    assert KEY in (sent.headers.get("x-api-key"), sent.headers.get("authorization", "")[7:])
    assert sent.headers["anthropic-version"]
    assert sent.body["model"] == "claude-haiku-4-5" and sent.body["max_tokens"] == 5
    (message,) = sent.body["messages"]
    assert message["role"] == "user" and "The film dragged on forever." in message["content"]
    assert (result.status, result.prediction, result.attempts) == ("ok", "negative", 1)
    assert (result.input_tokens, result.output_tokens) == (41, 2)
    assert result.cost_usd == pytest.approx((41 * 1.0 + 2 * 5.0) / 1e6)


def test_anthropic_overloaded_is_retried_and_auth_error_is_not(monkeypatch):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", KEY)
    replies = [recorded("anthropic_overloaded_529"), recorded("anthropic_message_200")]
    with WireServer(lambda r: replies.pop(0)) as server:
        result = asyncio.run(gateway(anthropic_arm(server.url)).call("claude", request()))
    assert (result.status, result.attempts, len(server.requests)) == ("ok", 2, 2)

    with WireServer(lambda r: recorded("anthropic_auth_401")) as server:
        result = asyncio.run(gateway(anthropic_arm(server.url)).call("claude", request()))
    assert (result.status, result.attempts, len(server.requests)) == ("llm_error", 1, 1)
    assert "401" in result.error and "invalid x-api-key" in result.error


def test_anthropic_key_must_be_in_the_named_variable(monkeypatch):
    monkeypatch.delenv("TEST_ANTHROPIC_KEY", raising=False)
    with pytest.raises(ArmError, match="TEST_ANTHROPIC_KEY is not set"):
        gateway(anthropic_arm("http://127.0.0.1:9"))


# ---------------------------------------------------------------------------------- bedrock
MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"


def bedrock_arm(url: str) -> dict:
    return {
        "name": "haiku-bedrock",
        "provider": "bedrock",
        "model": MODEL_ID,
        "region": "eu-west-1",
        "base_url": url,
        "input_price_per_1m": 0.25,
        "output_price_per_1m": 1.25,
        "max_output_tokens": 5,
    }


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE0TESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


def test_bedrock_converse_request_and_reply(aws_env):
    with WireServer(lambda r: recorded("bedrock_converse_200")) as server:
        gw = gateway(bedrock_arm(server.url))
        result = asyncio.run(gw.call("haiku-bedrock", request()))
        gw.close()
    (sent,) = server.requests
    assert unquote(sent.path) == f"/model/{MODEL_ID}/converse"
    auth = sent.headers["authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE0TESTKEY/")
    assert "/eu-west-1/bedrock/aws4_request" in auth  # SigV4 for the right region and service
    assert "x-amz-date" in sent.headers
    (message,) = sent.body["messages"]
    assert message["role"] == "user" and "dragged on" in message["content"][0]["text"]
    assert sent.body["inferenceConfig"] == {"maxTokens": 5, "temperature": 0.0}
    assert (result.status, result.prediction, result.attempts) == ("ok", "positive", 1)
    assert (result.input_tokens, result.output_tokens) == (38, 2)
    assert result.cost_usd == pytest.approx((38 * 0.25 + 2 * 1.25) / 1e6)


def test_bedrock_throttling_is_retried_and_validation_is_not(aws_env):
    replies = [recorded("bedrock_throttling_429")] * 2 + [recorded("bedrock_converse_200")]
    with WireServer(lambda r: replies.pop(0)) as server:
        gw = gateway(bedrock_arm(server.url))
        result = asyncio.run(gw.call("haiku-bedrock", request()))
        gw.close()
    assert (result.status, result.attempts, len(server.requests)) == ("ok", 3, 3)

    with WireServer(lambda r: recorded("bedrock_validation_400")) as server:
        gw = gateway(bedrock_arm(server.url))
        result = asyncio.run(gw.call("haiku-bedrock", request()))
        gw.close()
    assert (result.status, result.attempts) == ("llm_error", 1)
    assert "ValidationException" in result.error and "model identifier" in result.error


def test_bedrock_unreachable_endpoint_is_retried_then_fails(aws_env):
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = gateway(bedrock_arm(f"http://127.0.0.1:{port}"))
    result = asyncio.run(gw.call("haiku-bedrock", request()))
    gw.close()
    assert (result.status, result.attempts) == ("llm_error", 3)
    assert "connection failed" in result.error


def test_missing_sdk_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "anthropic", None)  # as if not installed
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", KEY)
    with pytest.raises(ArmError, match=r"pip install 'metallm\[anthropic\]'"):
        gateway(anthropic_arm("http://127.0.0.1:9"))
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ArmError, match=r"pip install 'metallm\[bedrock\]'"):
        gateway(bedrock_arm("http://127.0.0.1:9"))
