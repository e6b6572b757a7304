"""Arms behind any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, Together, llama.cpp
server…) through the official ``openai`` SDK with ``base_url``.

Arm keys: ``base_url`` (default: OpenAI), ``api_key_env`` (default ``OPENAI_API_KEY`` for
OpenAI itself; none needed for a local endpoint), ``http_client`` aiohttp (default) | httpx
(the SDK's transport), ``api`` chat | completions, ``constrain``
none | gbnf (llama.cpp server ``grammar``) | choice (vLLM ``guided_choice``) to confine the
answer server-side, and ``answer_mode: score``: one token is generated with its top-20
log-probabilities and each answer is scored by the most likely listed token that starts it
(answers sharing their first token tie, which is a parse error, never a guess). An open task's
prompt (no answer set) is generated freely in either mode, with the call's ``max_tokens`` and
``temperature`` when it sets them, and can be streamed (:meth:`OpenAIProvider.stream`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from service.config import ArmConfig
from service.llm.base import (
    CallRequest,
    Completion,
    LLMError,
    MissingExtra,
    api_key_from_env,
    redact,
    require,
)
from service.llm.http_errors import sdk_error
from service.llm.llamacpp import answers_grammar
from service.llm.scoring import calibrated, first_token_scores, pick
from service.tasks import Prompt

TOP_LOGPROBS = 20  # the most OpenAI returns


@dataclass(frozen=True)
class _Reply:
    """What is read of a completion: its text, first-token log-probabilities (score mode)
    and (input, output) tokens."""

    text: str
    top_logprobs: list[tuple[str, float]]
    tokens: tuple[int, int]


class OpenAIProvider:
    def __init__(self, arm: ArmConfig) -> None:
        self.sdk = require("openai", "openai", "openai")
        key_env = arm.api_key_env or (None if arm.base_url else "OPENAI_API_KEY")
        key = api_key_from_env(key_env, "openai")
        self._secrets = (key,) if key else ()
        self.arm = arm
        self.client = self.sdk.AsyncOpenAI(
            api_key=key or "unused",  # local endpoints take no key; the SDK insists on one
            base_url=arm.base_url,
            max_retries=0,  # the gateway retries
            timeout=arm.timeout_seconds,
            http_client=self._http_client(),
        )
        self._calibration: dict[tuple[str, tuple[str, ...]], dict[str, float]] = {}

    def _http_client(self) -> Any:
        """The SDK's aiohttp transport (``http_client: aiohttp``, the default: 1.6–3× the
        calls/s of its httpx one on the same CPU, benchmarks/pipeline_throughput), or None for the
        SDK's default httpx client."""
        if self.arm.http_client == "httpx":
            return None
        try:
            return self.sdk.DefaultAioHttpClient()
        except (AttributeError, RuntimeError):  # an older SDK, or its aiohttp extra missing
            raise MissingExtra(
                f"arm {self.arm.name!r}: the openai SDK's aiohttp transport is not installed: "
                "pip install 'metallm[openai]' (openai[aiohttp] >= 1.86), or set "
                "'http_client: httpx' on the arm"
            ) from None

    def _constraint(self, prompt: Prompt) -> dict[str, Any] | None:
        if self.arm.constrain == "gbnf":
            return {"grammar": answers_grammar(tuple(prompt.answers))}
        if self.arm.constrain == "choice":
            return {"guided_choice": list(prompt.answers)}
        return None

    def request_body(
        self, text: str, extra_body: dict[str, Any] | None = None, **kwargs: Any
    ) -> tuple[str, dict[str, Any]]:
        """The path (under ``base_url``) and JSON body of a completion request for ``text``."""
        body: dict[str, Any] = {"model": self.arm.model, "temperature": 0.0, **kwargs}
        if self.arm.api == "chat":
            body["messages"] = [{"role": "user", "content": text}]
            path = "/chat/completions"
        else:
            body["prompt"] = text
            path = "/completions"
        body.update(extra_body or {})
        return path, body

    def read_reply(self, raw: bytes, read_logprobs: bool) -> _Reply:
        """A completion's JSON, read; a body that is not one raises :class:`LLMError` showing
        (the redacted start of) what came."""
        try:
            return self._reply(json.loads(raw), read_logprobs)
        except (ValueError, LookupError, TypeError, AttributeError):
            # not JSON, or not a completion: show (the start of) what came; not retried, the
            # server answered. Redacted before it is cut, so no part of a key survives
            shown = (redact(raw.decode("utf-8", "replace"), self._secrets) or "")[:200]
            raise LLMError(f"openai: the response is not a completion: {shown!r}") from None

    async def _create(
        self,
        text: str,
        extra_body: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> _Reply:
        """POST the request through the SDK's client (its retries-off transport, auth and
        errors) with a plain JSON body, and read the reply from the response's JSON (its
        first-token log-probabilities too when the request asks for them).

        Two SDK steps are skipped, both pure CPU (py-spy, benchmarks/pipeline_throughput):
        ``completions.create``'s generic parameter transform, a no-op for these few plain
        values, and building the typed response model, of which only a few fields are read
        (``cast_to=bytes``, one of the raw types the SDK's ``post`` returns as they are)."""
        path, body = self.request_body(text, extra_body, **kwargs)
        try:
            raw = await self.client.post(path, body=body, cast_to=bytes)
        except self.sdk.OpenAIError as exc:
            raise sdk_error(exc, self.sdk, "openai", self._secrets) from None
        return self.read_reply(raw, "logprobs" in body)

    def _reply(self, response: dict[str, Any], read_logprobs: bool) -> _Reply:
        """The answer, token counts and (if asked for) first-token log-probabilities of a
        completion object; a missing usage counts no tokens, a null content is no answer."""
        choice = response["choices"][0]
        if self.arm.api == "chat":
            text = (choice.get("message") or {}).get("content") or ""
        else:
            text = choice.get("text") or ""
        usage = response.get("usage") or {}
        tokens = (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        return _Reply(str(text), self._top_logprobs(choice) if read_logprobs else [], tokens)

    def _top_logprobs(self, choice: dict[str, Any]) -> list[tuple[str, float]]:
        found = choice.get("logprobs")
        if not found:
            return []
        if self.arm.api == "chat":
            content = found.get("content") or []
            if not content:
                return []
            tops = content[0].get("top_logprobs") or []
            return [(str(t["token"]), float(t["logprob"])) for t in tops]
        tops = found.get("top_logprobs") or []
        first = tops[0] if tops else None
        return [(str(token), float(lp)) for token, lp in (first or {}).items()]

    async def _first_token(self, text: str) -> tuple[list[tuple[str, float]], tuple[int, int]]:
        if self.arm.api == "chat":
            kwargs = {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        else:
            kwargs = {"logprobs": TOP_LOGPROBS}
        reply = await self._create(text, max_tokens=1, **kwargs)
        return reply.top_logprobs, reply.tokens

    async def _score(self, prompt: Prompt) -> Completion:
        top, (tokens_in, tokens_out) = await self._first_token(prompt.text)
        scores = first_token_scores(top, prompt.answers)
        calibration = None
        if self.arm.calibrate and prompt.content_free is not None:
            key = (prompt.content_free, tuple(prompt.answers))
            if key not in self._calibration:
                cf_top, _ = await self._first_token(prompt.content_free)
                self._calibration[key] = first_token_scores(cf_top, prompt.answers, floor=True)
            calibration = self._calibration[key]
        best = pick(scores, calibration)
        return Completion(
            text=best or "",
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            scores=calibrated(scores, calibration),
        )

    async def complete(self, request: CallRequest) -> Completion:
        prompt = request.prompt
        if self.arm.answer_mode == "score" and not prompt.open:
            return await self._score(prompt)
        # an open prompt (no answer set) is generated freely: no grammar, no scoring
        constraint = None if prompt.open else self._constraint(prompt)
        reply = await self._create(
            prompt.text,
            max_tokens=request.max_tokens or self.arm.max_output_tokens,
            **({"extra_body": constraint} if constraint else {}),
            **({} if request.temperature is None else {"temperature": request.temperature}),
        )
        return Completion(reply.text.strip(), *reply.tokens)

    async def stream(self, request: CallRequest) -> AsyncIterator[str | Completion]:
        """An open prompt's answer streamed through the SDK's ``stream=True`` (the usage asked
        for with ``stream_options``): its text deltas, then the whole :class:`Completion`."""
        _, body = self.request_body(
            request.prompt.text,
            max_tokens=request.max_tokens or self.arm.max_output_tokens,
            stream=True,
            stream_options={"include_usage": True},
            **({} if request.temperature is None else {"temperature": request.temperature}),
        )
        create = self.client.chat.completions if self.arm.api == "chat" else self.client.completions
        parts: list[str] = []
        tokens = (0, 0)
        try:
            async with await create.create(**body) as chunks:
                async for chunk in chunks:
                    if chunk.usage is not None:
                        tokens = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    delta = choice.delta.content if self.arm.api == "chat" else choice.text
                    if delta:
                        parts.append(delta)
                        yield delta
        except self.sdk.OpenAIError as exc:
            raise sdk_error(exc, self.sdk, "openai", self._secrets) from None
        yield Completion("".join(parts).strip(), *tokens)

    async def aclose(self) -> None:
        """Close the HTTP pool, on the event loop that used it."""
        await self.client.close()

    def close(self) -> None:
        """Synchronous part of closing: nothing (the pool is closed by :meth:`aclose`)."""
