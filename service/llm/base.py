"""The small interface every LLM provider meets.

A provider turns a :class:`~service.tasks.Prompt` into a :class:`Completion`. It is async so the
service can keep many calls in flight; a provider whose client is blocking runs it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from service.tasks import Prompt


class LLMError(Exception):
    """A call failed. ``retryable`` says whether trying again could help."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Completion:
    """What a model answered, with its usage. ``cost_usd`` is set only by providers that know
    the real cost (replay); otherwise it is priced from the arm's config and the token counts."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None


@dataclass(frozen=True)
class CallRequest:
    query_id: str
    prompt: Prompt


class Provider(Protocol):
    async def complete(self, request: CallRequest) -> Completion: ...

    def close(self) -> None: ...
