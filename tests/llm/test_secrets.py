"""API keys never appear in logs or decision rows, even when a server echoes them back."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa

from service.config import parse_config
from service.events import QueryEvent
from service.llm.gateway import Gateway
from service.pipeline import Decider, QueryRecord, RewardSettings
from tests.helpers import TASKS, demo_rows, open_learning_log
from tests.llm.wire import WireServer

pytestmark = pytest.mark.integration

KEY = "sk-proj-SECRET-7d1e9b2c4a6f8e0d"
OTHER_KEY = "sk-other-SECRET-55aa11bb22cc"


def echo_key_500(request):
    """A hostile upstream: its error body repeats the request's Authorization header."""
    auth = request.headers.get("authorization", "")
    return (
        500,
        {"content-type": "application/json"},
        {"error": {"message": f"upstream failure for {auth} ({auth[7:]})", "type": "server_error"}},
    )


def chat_ok(request):
    return (
        200,
        {"content-type": "application/json"},
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": request.body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "positive"},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 30, "completion_tokens": 1, "total_tokens": 31},
        },
    )


def test_keys_stay_out_of_logs_and_rows(engine, embedder, monkeypatch, caplog):
    monkeypatch.setenv("LEAKY_KEY", KEY)
    monkeypatch.setenv("OTHER_KEY", OTHER_KEY)
    rows = [r for r in demo_rows(60) if r["task"] == "sentiment"][:6]
    with WireServer(echo_key_500) as leaky, WireServer(chat_ok) as good:
        arm = {"provider": "openai", "model": "m", "retry_backoff_seconds": 0.01}
        config = parse_config(
            {
                "tasks": TASKS,
                "arms": [
                    {**arm, "name": "leaky", "base_url": f"{leaky.url}/v1",
                     "api_key_env": "LEAKY_KEY", "max_retries": 1, "fallback": "good"},
                    {**arm, "name": "good", "base_url": f"{good.url}/v1",
                     "api_key_env": "OTHER_KEY"},
                ],
            }
        )  # fmt: skip
        learning_log = open_learning_log(engine, "linucb", {"epsilon": 1.0, "seed": 0})
        decider = Decider(
            config, learning_log, embedder, Gateway(config), RewardSettings(0.1, 0.001)
        )
        caplog.set_level(logging.DEBUG)  # everything, the SDK's and httpx's debug lines too
        try:
            decider.decide(
                [QueryRecord(QueryEvent(query_id=r["query_id"], text=r["text"],
                                        task=r["task"])) for r in rows]
            )  # fmt: skip
        finally:
            decider.close()
    # the keys did go to the servers, and the hostile one sent its back
    assert leaky.requests and all(
        r.headers["authorization"] == f"Bearer {KEY}" for r in leaky.requests
    )
    assert good.requests[0].headers["authorization"] == f"Bearer {OTHER_KEY}"
    with engine.connect() as conn:
        dumped = [
            row[0] for row in conn.execute(sa.text("SELECT row_to_json(d)::text FROM decisions d"))
        ]
        errors = [e for (e,) in conn.execute(sa.text("SELECT error FROM decisions")) if e]
    assert len(dumped) == 6
    assert errors and all("upstream failure for Bearer ***" in e for e in errors)
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "upstream failure" in logged  # the failures were logged...
    for secret in (KEY, OTHER_KEY, KEY[8:], OTHER_KEY[9:]):
        assert secret not in logged  # ...without the keys
        assert not any(secret in d for d in dumped)
