"""Checks of a query against what it enters: an id already taken by another query, and a text
too long for an arm's context window. Pure functions; the decider applies them.

An id names one query. A query event whose id was decided before (in an earlier batch, or
earlier in the same one) is the same query when its task, text, label set and metadata are the
same: its stored decision is published again (a redelivery, or an app re-sending it). Anything
else reuses the id for another query: the event is rejected with the reason, so that an app
never gets the answer to a different query.

    >>> first = StoredQuery("sentiment", "I loved it", ("positive", "negative"), {"lang": "en"})
    >>> difference(first, first) is None
    True
    >>> difference(first, StoredQuery("sentiment", "I hated it", first.options, first.metadata))
    "query id 'q' is taken by another query (a different text)"

A text's tokens are estimated as its characters / 4 (rounded up): an arm is offered a query
when the prompt's estimate and the arm's ``max_output_tokens`` fit its ``context_tokens``.

    >>> estimate_tokens("x" * 10)
    3
"""

from __future__ import annotations

import math

from service.config import AppConfig, ArmConfig
from service.events import QueryEvent
from service.log.rows import StoredQuery

CHARS_PER_TOKEN = 4


def query_of(event: QueryEvent, config: AppConfig) -> StoredQuery:
    """The query of an event: its label set is its ``options``, else its task's labels."""
    task = config.tasks.get(event.task)
    labels = event.options or (task.labels if task is not None else [])
    return StoredQuery(event.task, event.text, tuple(labels), event.metadata)


def difference(stored: StoredQuery, query: StoredQuery, query_id: str = "q") -> str | None:
    """Why ``query`` cannot take the id of ``stored`` (None: it is the same query)."""
    differs = [
        name
        for name, a, b in (
            ("task", stored.task, query.task),
            ("text", stored.text, query.text),
            ("options", stored.options, query.options),
            ("metadata", stored.metadata or {}, query.metadata or {}),
        )
        if a != b
    ]
    if not differs:
        return None
    return f"query id {query_id!r} is taken by another query (a different {', '.join(differs)})"


def estimate_tokens(text: str) -> int:
    """The tokens of ``text``, estimated as characters / 4 (rounded up)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def context_tokens(arm: ArmConfig) -> int | None:
    """An arm's context window in tokens: ``context_tokens`` if set, a llama.cpp arm's
    ``n_ctx`` otherwise; None when not known (not limited)."""
    if arm.context_tokens is not None:
        return arm.context_tokens
    return arm.n_ctx if arm.provider == "llamacpp" else None


def fits(arm: ArmConfig, prompt: str) -> bool:
    """Whether ``prompt`` and the arm's answer fit its context window (by the estimate)."""
    window = context_tokens(arm)
    return window is None or estimate_tokens(prompt) + arm.max_output_tokens <= window


def arms_that_fit(config: AppConfig, arms: list[str], prompt: str) -> list[str]:
    """Of ``arms`` (names), those whose context window holds ``prompt``, in their order."""
    return [name for name in arms if fits(config.arm(name), prompt)]
