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
when the prompt's estimate and the arm's ``max_output_tokens`` fit its ``context_tokens``. The
policy then chooses among the arms offered, so the propensity logged is that of the draw made.
A query that fits no arm is rejected, or (``METALLM_TOO_LONG_TEXT=truncate``) its text is cut
to fit the largest window (:func:`truncated`).

    >>> estimate_tokens("x" * 10)
    3
    >>> config = AppConfig.model_validate({
    ...     "tasks": {"t": {"kind": "classification", "labels": ["a", "b"]}},
    ...     "arms": [{"name": "small", "provider": "openai", "model": "m", "context_tokens": 100},
    ...              {"name": "big", "provider": "openai", "model": "m"}]})
    >>> offered_arms(config, ["small", "big"], ["short", "x" * 400])
    [('small', 'big'), ('big',)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from service.config import AppConfig, ArmConfig
from service.events import QueryEvent
from service.log.rows import StoredQuery
from service.policy.base import Choice, RoutingPolicy

#: the one estimate of a text's tokens from its length, for context windows and for prices
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


def fits(arm: ArmConfig, prompt: str, output_tokens: int | None = None) -> bool:
    """Whether ``prompt`` and the arm's answer (``output_tokens``, an open task's limit; None:
    the arm's ``max_output_tokens``) fit its context window (by the estimate).

    >>> arm = ArmConfig(name="a", provider="openai", model="m", context_tokens=600)
    >>> fits(arm, "x" * 400), fits(arm, "x" * 400, output_tokens=512)
    (True, False)
    """
    window = context_tokens(arm)
    answer = arm.max_output_tokens if output_tokens is None else output_tokens
    return window is None or estimate_tokens(prompt) + answer <= window


def arms_that_fit(
    config: AppConfig, arms: list[str], prompt: str, output_tokens: int | None = None
) -> list[str]:
    """Of ``arms`` (names), those whose context window holds ``prompt``, in their order."""
    return [name for name in arms if fits(config.arm(name), prompt, output_tokens)]


def offered_arms(
    config: AppConfig,
    available: list[str],
    prompts: Sequence[str],
    output_tokens: Sequence[int | None] | None = None,
) -> list[tuple[str, ...]]:
    """The arms offered for each prompt (answered in its ``output_tokens``, None: each arm's
    own): those of ``available`` (the gateway's: circuits not open) that fit it; when none of
    those fits, the configured arms that fit (their calls fail fast while their circuit is
    open); when none fits at all, ``available``."""
    outputs = output_tokens if output_tokens is not None else [None] * len(prompts)
    return [
        tuple(
            arms_that_fit(config, available, prompt, out)
            or arms_that_fit(config, config.arm_names, prompt, out)
            or available
        )
        for prompt, out in zip(prompts, outputs, strict=True)
    ]


def choose_among(
    policy: RoutingPolicy, offered: Sequence[tuple[str, ...]], contexts: np.ndarray
) -> list[Choice]:
    """The policy's choice for each row of ``contexts`` among the arms ``offered`` to it: one
    ``choose_many`` per set of arms, so each choice's propensity is that of its own draw."""
    rows_of: dict[tuple[str, ...], list[int]] = {}
    for row, arms in enumerate(offered):
        rows_of.setdefault(arms, []).append(row)
    choices: list[Choice | None] = [None] * len(offered)
    for arms, rows in rows_of.items():
        for row, choice in zip(rows, policy.choose_many(list(arms), contexts[rows]), strict=True):
            choices[row] = choice
    return [c for c in choices if c is not None]


def largest_window(config: AppConfig) -> tuple[int, ArmConfig] | None:
    """The largest context window of the arms, with its arm (None: one is not limited)."""
    windows = [(context_tokens(arm), arm) for arm in config.arms]
    if any(w is None for w, _ in windows):
        return None
    return max(((w, a) for w, a in windows if w is not None), key=lambda pair: pair[0])


def truncated(text: str, prompt: str, config: AppConfig, output_tokens: int | None = None) -> str:
    """``text`` cut (its end dropped) so that its prompt, which holds it, fits the largest
    context window by the estimate.

    >>> config = AppConfig.model_validate({
    ...     "tasks": {"t": {"kind": "classification", "labels": ["a", "b"]}},
    ...     "arms": [{"name": "small", "provider": "openai", "model": "m", "context_tokens": 100,
    ...               "max_output_tokens": 8}]})
    >>> text = "y" * 1000
    >>> cut = truncated(text, "Q: " + text, config)
    >>> len(cut), fits(config.arm("small"), "Q: " + cut)
    (365, True)
    """
    largest = largest_window(config)
    if largest is None:
        return text
    window, arm = largest
    answer = arm.max_output_tokens if output_tokens is None else output_tokens
    budget_chars = (window - answer) * CHARS_PER_TOKEN
    excess = len(prompt) - budget_chars
    return text if excess <= 0 else text[: max(1, len(text) - excess)]


def too_long_reason(config: AppConfig, prompt: str, output_tokens: int | None = None) -> str | None:
    """Why no arm can take ``prompt`` with its answer (None: one can)."""
    if any(fits(arm, prompt, output_tokens) for arm in config.arms):
        return None
    largest = largest_window(config)
    window = largest[0] if largest else 0
    return (
        f"text too long: its prompt is ~{estimate_tokens(prompt)} tokens (characters / "
        f"{CHARS_PER_TOKEN}), more than any arm's context window (the largest: {window} "
        "tokens, less the answer's max_output_tokens)"
    )
