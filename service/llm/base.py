"""The small interface every LLM provider meets, and helpers the adapters share.

A provider turns a :class:`~service.tasks.Prompt` into a :class:`Completion`. It is async so the
service can keep many calls in flight; a provider whose client is blocking runs it in a thread.
Providers make exactly one attempt per ``complete``: retries, timeouts, concurrency limits and
fallback live in :class:`~service.llm.gateway.Gateway`, so every SDK is built with its own
retries off.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

from service.tasks import Prompt

#: HTTP statuses worth retrying: request timeout, conflict, rate limit, server errors.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


class LLMError(Exception):
    """A call failed. ``retryable`` says whether trying again could help; ``retry_after`` is
    the server's Retry-After hint in seconds, when it gave one."""

    def __init__(
        self, message: str, retryable: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class InputTooLong(LLMError):
    """The arm refused the prompt: it does not fit the model's context window. Not retried,
    not a fault of the arm (its circuit breaker does not count it), not learnt from."""


#: how providers say that a prompt does not fit the context window (OpenAI, llama.cpp's
#: server and library, Anthropic, vLLM)
TOO_LONG = re.compile(
    r"context_length_exceeded|maximum context length|exceeds? (the )?(available )?context"
    r"|context window|prompt is too long|exceed_context_size",
    re.IGNORECASE,
)


class MissingExtra(RuntimeError):
    """A provider's optional SDK is not installed; the message names the extra to install."""


@dataclass(frozen=True)
class Completion:
    """What a model answered, with its usage. ``cost_usd`` is set only by providers that know
    the real cost (replay); otherwise it is priced from the arm's config and the token counts.
    ``scores`` holds the per-answer log-scores of option scoring, when that mode was used.
    ``waited_ms``: how long the request queued inside the provider before its model took it
    (a local model serves one call at a time), counted as waiting, not as the call's latency."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    scores: dict[str, float] | None = None
    waited_ms: float = 0.0


@dataclass(frozen=True)
class CallRequest:
    """One call of one arm. ``max_tokens`` and ``temperature`` override the arm's own settings
    for this call (a task's output limit, an HTTP request's fields); None keeps the arm's."""

    query_id: str
    prompt: Prompt
    max_tokens: int | None = None
    temperature: float | None = None


class Provider(Protocol):
    async def complete(self, request: CallRequest) -> Completion: ...

    def close(self) -> None: ...


class Streaming(Protocol):
    """A provider that can also stream (OpenAI-compatible, llama.cpp): ``stream`` yields the
    answer's text deltas as they come, then one :class:`Completion` (the whole text, stripped,
    and the usage). One attempt, as ``complete``; see :mod:`service.llm.streaming`."""

    def stream(self, request: CallRequest) -> AsyncIterator[str | Completion]: ...


def require(module: str, extra: str, package: str) -> ModuleType:
    """Import an optional SDK, or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            f"this arm needs the {package!r} package: pip install 'metallm[{extra}]'"
        ) from None


def api_key_from_env(variable: str | None, provider: str) -> str | None:
    """The API key held by the environment variable ``variable`` (its name comes from config).
    The error names the variable, never a value."""
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise RuntimeError(f"{provider} arm: environment variable {variable} is not set")
    return key


def redact(text: str | None, secrets: tuple[str, ...]) -> str | None:
    """``text`` with every secret replaced by ``***`` (error messages can echo request data)."""
    if text is None:
        return None
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a Retry-After (or retry-after-ms) header; None when absent or a date."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        if "retry-after-ms" in lower:
            return max(0.0, float(lower["retry-after-ms"]) / 1000)
        if "retry-after" in lower:
            value = float(lower["retry-after"])
            return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        return None
    return None
