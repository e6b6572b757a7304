"""Streamed calls: an open prompt's answer passed on token by token while the arm writes it.

The gateway streams a call when it is given a :class:`Relay` and the arm's provider can stream
(:class:`~service.llm.base.Streaming`: OpenAI-compatible and llama.cpp arms) and the prompt is
open (free text). A classification prompt's answer is a label parsed from the whole reply, so
it is not streamed (the door sends it as one chunk), nor is any answer of a provider that
cannot stream (anthropic, bedrock, replay).

Retries, circuit breakers and fallback keep their rules until the first token went out; after
it, a failure (an error from the arm, a broken connection, the arm's timeout) is
:class:`StreamBroken`: not retried, no fallback (the client already holds part of an answer),
and the call is an ``llm_error`` of the chosen arm (its decision stored as failed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from service.llm.base import CallRequest, Completion, LLMError, Provider, Streaming
from service.tasks import Prompt


class StreamBroken(LLMError):
    """A stream failed after some of its text was sent: not retried, no fallback."""


class Relay:
    """Passes a call's text deltas on as they come (``send`` is called on the gateway's event
    loop: it must not block) and remembers whether any went out. Leading whitespace is held
    back (the stored answer is stripped).

    >>> got = []
    >>> relay = Relay(got.append)
    >>> relay("  "); relay.sent
    False
    >>> relay(" Hi"); relay(", you"); got, relay.sent
    (['Hi', ', you'], True)
    """

    def __init__(self, send: Callable[[str], None]) -> None:
        self.send = send
        self.sent = False

    def __call__(self, delta: str) -> None:
        if not self.sent:
            delta = delta.lstrip()
        if delta:
            self.sent = True
            self.send(delta)


def streams(provider: Provider, prompt: Prompt) -> bool:
    """Whether a call of ``prompt`` on ``provider`` is streamed: an open prompt, on a provider
    that can stream."""
    return prompt.open and callable(getattr(provider, "stream", None))


def failed(message: str, relay: Relay | None, retryable: bool = False) -> LLMError:
    """The error of an attempt: :class:`StreamBroken` once text went out, else an
    :class:`LLMError` (``retryable`` as given)."""
    if relay is not None and relay.sent:
        return StreamBroken(f"the stream broke after its first tokens: {message}")
    return LLMError(message, retryable)


async def consume(provider: Provider, request: CallRequest, relay: Relay) -> Completion:
    """One streamed attempt: every delta passed to ``relay``, the final completion returned."""
    final: Completion | None = None
    try:
        async for part in cast(Streaming, provider).stream(request):
            if isinstance(part, Completion):
                final = part
            else:
                relay(part)
    except LLMError as exc:
        if relay.sent:
            raise failed(str(exc), relay) from None
        raise
    except Exception as exc:  # a connection lost mid-stream, say: retried only before a token
        raise failed(f"{type(exc).__name__}: {exc}", relay, retryable=True) from None
    if final is None:
        raise failed("the stream ended before its end", relay, retryable=True)
    return final
