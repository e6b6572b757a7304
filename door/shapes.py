"""The OpenAI shapes the door speaks: what a chat completion request may ask, the query it
makes, and the responses (a completion, its stream's chunks, an error, the model list). Pure.

>>> body = {"model": "metallm/sentiment", "messages": [{"role": "user", "content": "Great!"}]}
>>> req = parse_request(body, ["sentiment", "topic"])
>>> req.task, req.text, req.stream
('sentiment', 'Great!', False)
>>> parse_request({**body, "tools": [], "n": 2}, ["sentiment"])
Traceback (most recent call last):
...
door.shapes.RequestError: unsupported fields: n (only 1), tools
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.log.rows import PublicDecision

#: the model name that routes to the config's first task; ``metallm/<task>`` names a task
MODEL = "metallm"
#: the request fields the door honours (any other is refused, naming it)
HONOURED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "stream",
        "stream_options",
        "user",
        "metadata",
        "n",
    }
)
#: the fields that do not change the query (a retry may differ in them)
NOT_HASHED = frozenset({"stream", "stream_options"})
ROLES = frozenset({"system", "developer", "user", "assistant"})
#: a decision's status whose answer is an error: the HTTP status and the OpenAI error type
FAILED = {"llm_error": (502, "upstream_error"), "input_too_long": (400, "invalid_request_error")}


class RequestError(ValueError):
    """A request the door refuses: 400 with the message (``status`` 404 for an unknown model)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    """What a chat completion request asks of the router."""

    task: str
    text: str
    query_id: str | None  # from metadata.query_id (the Idempotency-Key header wins)
    metadata: dict[str, Any] | None
    max_tokens: int | None
    temperature: float | None
    stream: bool
    body_sha256: str


def task_of(model: object, tasks: Sequence[str]) -> str:
    """The task a ``model`` names: ``metallm`` is the first task, ``metallm/<task>`` that one.

    >>> task_of("metallm", ["a", "b"]), task_of("metallm/b", ["a", "b"])
    ('a', 'b')
    """
    if model == MODEL:
        return tasks[0]
    if isinstance(model, str) and model.startswith(MODEL + "/") and model[8:] in tasks:
        return model[8:]
    known = ", ".join([MODEL, *(f"{MODEL}/{t}" for t in tasks)])
    raise RequestError(f"unknown model {model!r}; the models are: {known}", 404, "model")


def query_text(messages: object) -> str:
    """The query: the content of the last ``user`` message (text parts joined by newlines).

    >>> query_text([{"role": "system", "content": "Be brief."},
    ...             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    'Hi'
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: a non-empty list of messages is required", param="messages")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages: unsupported message {m!r:.80}", param="messages")
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise RequestError("messages: no user message to route", param="messages")
    content = users[-1].get("content")
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict)]
        if len(parts) != len(content) or any(p.get("type") != "text" for p in parts):
            raise RequestError("messages: only text content is supported", param="messages")
        content = "\n".join(str(p.get("text", "")) for p in parts)
    if not isinstance(content, str) or not content.strip():
        raise RequestError("messages: the last user message has no text", param="messages")
    return content


def body_hash(body: Mapping[str, Any]) -> str:
    """The hash of what a request asks (not how it wants the answer delivered)."""
    kept = {k: v for k, v in body.items() if k not in NOT_HASHED}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _number(body: Mapping[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        raise RequestError(
            f"{name}: expected {'an integer' if kind is int else 'a number'}", param=name
        )
    if value < (1 if kind is int else 0):
        raise RequestError(f"{name}: out of range", param=name)
    return kind(value)


def parse_request(body: object, tasks: Sequence[str]) -> ChatRequest:
    """A chat completion request's ask, or :class:`RequestError` naming what is wrong."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    unsupported = sorted(k for k in body if k not in HONOURED)
    if body.get("n") not in (None, 1):
        unsupported = sorted(["n (only 1)", *unsupported])
    if unsupported:
        raise RequestError(f"unsupported fields: {', '.join(unsupported)}", param=unsupported[0])
    task = task_of(body.get("model"), tasks)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise RequestError("metadata: expected an object", param="metadata")
    metadata = dict(metadata or {})
    query_id = metadata.pop("query_id", None)
    if query_id is not None and not isinstance(query_id, str):
        raise RequestError("metadata.query_id: expected a string", param="metadata")
    if body.get("user") is not None:
        metadata.setdefault("user", body["user"])
    max_tokens = _number(body, "max_completion_tokens", int) or _number(body, "max_tokens", int)
    return ChatRequest(
        task=task,
        text=query_text(body.get("messages")),
        query_id=query_id,
        metadata=metadata or None,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", float),
        stream=bool(body.get("stream")),
        body_sha256=body_hash(body),
    )


def answer_text(decision: PublicDecision) -> str:
    """The answer of a decision: its prediction (a label) or else the arm's raw text.

    >>> from service.decision import Decision
    >>> answer_text(PublicDecision.of(Decision.example(prediction=None, raw_output="Hi.")))
    'Hi.'
    """
    if decision.prediction is not None:
        return decision.prediction
    return decision.raw_output or ""


def routing(decision: PublicDecision, replayed: bool) -> dict[str, Any]:
    """The ``metallm`` field: how the router answered (``replayed``: a stored decision)."""
    d = decision
    return {
        "query_id": d.query_id,
        "task": d.task,
        "arm": d.arm,
        "propensity": d.propensity,
        "status": d.status,
        "prediction": d.prediction,
        "error": d.error,
        "fallback_arm": d.fallback_arm,
        "attempts": d.attempts,
        "cost_usd": d.cost_usd,
        "latency_ms": d.latency_ms,
        "replayed": replayed,
    }


def headers(decision: PublicDecision) -> dict[str, str]:
    """The ``x-metallm-*`` headers of an answer."""
    return {
        "x-metallm-query-id": decision.query_id,
        "x-metallm-arm": decision.arm,
        "x-metallm-propensity": repr(float(decision.propensity)),
    }


def _created(decision: PublicDecision) -> int:
    return int(decision.decided_at.timestamp())


def _head(kind: str, query_id: str, task: str, created: int) -> dict[str, Any]:
    """The fields a completion and each chunk of a stream begin with."""
    return {
        "id": f"chatcmpl-{query_id}",
        "object": kind,
        "created": created,
        "model": f"{MODEL}/{task}",
    }


def _usage(decision: PublicDecision) -> dict[str, int]:
    prompt, output = int(decision.input_tokens or 0), int(decision.output_tokens or 0)
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


def completion(decision: PublicDecision, replayed: bool) -> dict[str, Any]:
    """A ``chat.completion`` of a decision."""
    return {
        **_head("chat.completion", decision.query_id, decision.task, _created(decision)),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer_text(decision)},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(decision),
        "metallm": routing(decision, replayed),
    }


def delta_chunk(query_id: str, task: str, created: int, text: str, first: bool) -> dict:
    """A ``chat.completion.chunk`` carrying a piece of the answer (the first one its role too).

    >>> delta_chunk("q1", "chat", 0, "Hel", True)["choices"][0]["delta"]
    {'role': 'assistant', 'content': 'Hel'}
    """
    delta = {"role": "assistant", "content": text} if first else {"content": text}
    return {
        **_head("chat.completion.chunk", query_id, task, created),
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }


def last_chunk(decision: PublicDecision, replayed: bool) -> dict[str, Any]:
    """A stream's last chunk: its end, the usage and the ``metallm`` field of the decision."""
    return {
        **_head("chat.completion.chunk", decision.query_id, decision.task, _created(decision)),
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": _usage(decision),
        "metallm": routing(decision, replayed),
    }


def chunks(decision: PublicDecision, replayed: bool) -> list[dict[str, Any]]:
    """A stream of a stored decision (or an answer not streamed): the whole answer in one
    chunk, then its end."""
    d = decision
    first = delta_chunk(d.query_id, d.task, _created(d), answer_text(d), True)
    return [first, last_chunk(d, replayed)]


def stream_error(message: str, kind: str, decision: PublicDecision | None = None) -> dict:
    """The event that ends a stream which failed after its first tokens (the OpenAI SDK raises
    it as an ``APIError``), with the ``metallm`` field of the decision when it was stored."""
    if decision is None:
        return error(message, kind)
    return {**error(message, kind, code=decision.status), "metallm": routing(decision, False)}


def error(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def models(tasks: Sequence[str]) -> dict[str, Any]:
    """``GET /v1/models``: ``metallm`` (the first task) and ``metallm/<task>`` for each task."""
    names = [MODEL, *(f"{MODEL}/{t}" for t in tasks)]
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "metallm"} for n in names],
    }
