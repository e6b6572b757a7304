"""An in-process local arm: llama-cpp-python over a GGUF file.

Two answer modes, both confined to the prompt's answers, so the query text cannot push the
model outside the label set (an open task's prompt has no answer set: it is generated freely,
without a grammar, in either mode):

- ``generate`` (default): decoding is constrained by a GBNF grammar to the answers.
- ``score``: every answer is scored by its exact log-probability as the continuation of the
  prompt, and the most likely one wins; ``calibrate`` subtracts the log-probability of the same
  answer after a content-free input (see :mod:`service.llm.scoring`).

An open prompt can also be streamed (:meth:`LlamaCppProvider.stream`, ``stream=True`` of
llama-cpp-python): its tokens are handed over as they are decoded.

One model instance serves one call at a time (llama.cpp contexts are not thread-safe); calls
run in a worker thread so the event loop keeps going. The time a call waits for the model is
told apart from its own (``Completion.waited_ms``): a burst queued on a local model does not
show as a slow model.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import lru_cache

import numpy as np

from service.llm.base import TOO_LONG, CallRequest, Completion, InputTooLong, LLMError, MissingExtra
from service.llm.local_models import resolve
from service.llm.scoring import calibrated, pick
from service.tasks import Prompt

#: how often a streamed call queued for the model looks whether it was given up
LOCK_POLL_S = 0.05


def answers_grammar(answers: tuple[str, ...]) -> str:
    """A GBNF grammar that accepts exactly one of the answers, with an optional leading space."""
    alternatives = " | ".join(json.dumps(a, ensure_ascii=False) for a in answers)
    return f'root ::= " "? ({alternatives})'


class LlamaCppProvider:
    def __init__(
        self,
        model: str,
        max_output_tokens: int = 8,
        n_threads: int | None = None,
        n_ctx: int = 2048,
        answer_mode: str = "generate",
        calibrate: bool = False,
    ) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise MissingExtra(
                "the llamacpp provider needs llama-cpp-python: pip install 'metallm[local]'"
            ) from None
        path, self.chat = resolve(model)
        self._llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        self.max_output_tokens = max_output_tokens
        self.answer_mode = answer_mode
        self.calibrate = calibrate
        self._lock = threading.Lock()
        self._calibration: dict[tuple[str, tuple[str, ...]], dict[str, float]] = {}
        self._formatter = self._chat_formatter() if self.chat else None

    @lru_cache(maxsize=256)  # noqa: B019 - one provider per arm, lives as long as the service
    def _decoding(self, answers: tuple[str, ...]):
        """The grammar for one answer set and the tokens its longest answer needs (with room
        for a leading space and the end): built once, not on every call."""
        from llama_cpp import LlamaGrammar

        grammar = LlamaGrammar.from_string(answers_grammar(answers), verbose=False)
        longest = max(len(self._llm.tokenize(a.encode(), add_bos=False)) for a in answers)
        return grammar, longest + 2

    # ------------------------------------------------------------------ generate mode
    def _generate(self, request: CallRequest) -> Completion:
        """Decode under the answer set's grammar; an open prompt (no answer set) freely, up to
        the call's ``max_tokens``. The call's ``temperature`` applies when it sets one."""
        prompt = request.prompt
        if prompt.open:
            grammar, max_tokens = None, request.max_tokens or self.max_output_tokens
        else:
            grammar, least = self._decoding(tuple(prompt.answers))
            max_tokens = max(request.max_tokens or self.max_output_tokens, least)
        sampling = {
            "grammar": grammar,
            "max_tokens": max_tokens,
            "temperature": 0.0 if request.temperature is None else request.temperature,
        }
        try:
            if self.chat:
                out = self._llm.create_chat_completion(
                    messages=[{"role": "user", "content": prompt.text}], **sampling
                )
                text = out["choices"][0]["message"]["content"] or ""
            else:
                out = self._llm.create_completion(prompt.text, **sampling)
                text = out["choices"][0]["text"]
        except ValueError as exc:  # e.g. prompt longer than the context window
            error = InputTooLong if TOO_LONG.search(str(exc)) else LLMError
            raise error(f"llama.cpp rejected the call: {exc}") from None
        usage = out.get("usage") or {}
        return Completion(
            text=text.strip(),
            input_tokens=int(usage.get("prompt_tokens", 0)),
            output_tokens=int(usage.get("completion_tokens", 0)),
        )

    # ------------------------------------------------------------------ score mode
    def _chat_formatter(self):
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def token_text(token: int) -> str:
            return self._llm.detokenize([token], special=True).decode("utf-8", "ignore")

        eos = token_text(self._llm.token_eos())
        bos = token_text(self._llm.token_bos())
        return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    def _scoring_text(self, text: str) -> tuple[str, str]:
        """(the text the answers continue, the separator before an answer)."""
        if self._formatter is not None:
            formatted = self._formatter(messages=[{"role": "user", "content": text}]).prompt
            return formatted, ""
        return text, "" if text[-1:].isspace() else " "

    def _last_logprobs(self) -> np.ndarray:
        n_vocab = self._llm.n_vocab()
        logits = np.ctypeslib.as_array(self._llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        shifted = logits.astype(np.float64) - float(logits.max())
        return shifted - np.log(np.exp(shifted).sum())

    def _eval_prompt(self, tokens: list[int]) -> None:
        """Evaluate ``tokens`` in one batch from an empty cache. Reusing a cached prefix would
        be faster, but llama.cpp's quantized kernels round differently per batch shape (about
        0.05 in log-probability here), so the same query could score differently depending on
        the call before it; from scratch, identical inputs give identical scores."""
        self._llm.reset()
        self._llm.eval(tokens)

    def _answer_logprobs(self, text: str, answers: list[str]) -> tuple[dict[str, float], int]:
        """log p(answer | text) for each answer (all of its tokens), and the tokens evaluated."""
        llm = self._llm
        context, sep = self._scoring_text(text)
        tokens = llm.tokenize(context.encode("utf-8"), add_bos=True, special=True)
        if len(tokens) + 16 >= llm.n_ctx():
            raise InputTooLong(f"prompt of {len(tokens)} tokens exceeds the context window")
        self._eval_prompt(tokens)
        n_prompt = llm.n_tokens
        first = self._last_logprobs()
        evaluated = len(tokens)
        scores = {}
        for answer in answers:
            answer_tokens = llm.tokenize((sep + answer).encode("utf-8"), add_bos=False)
            logprob = float(first[answer_tokens[0]])
            llm.n_tokens = n_prompt
            for prev, nxt in zip(answer_tokens, answer_tokens[1:], strict=False):
                llm.eval([prev])
                logprob += float(self._last_logprobs()[nxt])
            evaluated += len(answer_tokens) - 1
            scores[answer] = logprob
        llm.n_tokens = n_prompt
        return scores, evaluated

    def _score(self, prompt: Prompt) -> Completion:
        scores, evaluated = self._answer_logprobs(prompt.text, prompt.answers)
        calibration = None
        if self.calibrate and prompt.content_free is not None:
            key = (prompt.content_free, tuple(prompt.answers))
            if key not in self._calibration:
                self._calibration[key], _ = self._answer_logprobs(
                    prompt.content_free, prompt.answers
                )
            calibration = self._calibration[key]
        best = pick(scores, calibration)
        return Completion(
            text=best or "",
            input_tokens=evaluated,
            output_tokens=0,
            scores=calibrated(scores, calibration),
        )

    # ------------------------------------------------------------------ provider interface
    def _call(self, request: CallRequest, asked: float) -> Completion:
        """One call, under the model's lock; the time from ``asked`` until the model took it
        (a thread to run on, the calls before it) is told as ``waited_ms``."""
        with self._lock:
            waited_ms = (time.perf_counter() - asked) * 1000
            if self.answer_mode == "score" and not request.prompt.open:
                completion = self._score(request.prompt)
            else:
                completion = self._generate(request)
        return replace(completion, waited_ms=waited_ms)

    async def complete(self, request: CallRequest) -> Completion:
        return await asyncio.to_thread(self._call, request, time.perf_counter())

    async def stream(self, request: CallRequest) -> AsyncIterator[str | Completion]:
        """An open prompt's answer streamed with llama-cpp-python's ``stream=True``: the model
        decodes on a worker thread and hands each token's text to the event loop."""
        loop = asyncio.get_running_loop()
        parts: asyncio.Queue[str | Completion | BaseException] = asyncio.Queue()

        def put(part: str | Completion | BaseException) -> None:
            loop.call_soon_threadsafe(parts.put_nowait, part)

        stop = threading.Event()
        worker = asyncio.ensure_future(
            asyncio.to_thread(self._streamed, request, time.perf_counter(), put, stop)
        )
        try:
            while True:
                part = await parts.get()
                if isinstance(part, BaseException):
                    raise part
                yield part
                if isinstance(part, Completion):
                    return
        finally:
            stop.set()  # a consumer gone early (a timeout): the model stops decoding
            await asyncio.shield(worker)

    def _streamed(
        self,
        request: CallRequest,
        asked: float,
        put: Callable[[str | Completion | BaseException], None],
        stop: threading.Event,
    ) -> None:
        """Decode an open prompt under the model's lock, ``put`` each token's text, then the
        whole :class:`Completion` (or the error); ``stop`` ends it early (or before it runs,
        while it waits for the model)."""
        while not self._lock.acquire(timeout=LOCK_POLL_S):
            if stop.is_set():
                return
        try:
            waited_ms = (time.perf_counter() - asked) * 1000
            completion = replace(self._decode(request, put, stop), waited_ms=waited_ms)
        except ValueError as exc:  # e.g. prompt longer than the context window
            error = InputTooLong if TOO_LONG.search(str(exc)) else LLMError
            put(error(f"llama.cpp rejected the call: {exc}"))
            return
        except Exception as exc:  # told to the stream's reader, who raises it
            put(exc)
            return
        finally:
            self._lock.release()
        put(completion)

    def _decode(
        self, request: CallRequest, put: Callable[[str], None], stop: threading.Event
    ) -> Completion:
        """The streamed decoding (the caller holds the model). The stream carries no usage:
        the output tokens are its pieces, the input tokens the rest of the model's context."""
        sampling = {
            "max_tokens": request.max_tokens or self.max_output_tokens,
            "temperature": 0.0 if request.temperature is None else request.temperature,
            "stream": True,
        }
        text, parts = request.prompt.text, []
        if self.chat:
            messages = [{"role": "user", "content": text}]
            chunks = self._llm.create_chat_completion(messages=messages, **sampling)
        else:
            chunks = self._llm.create_completion(text, **sampling)
        for chunk in chunks:
            choice = chunk["choices"][0]
            piece = (choice.get("delta") or {}).get("content") if self.chat else choice["text"]
            if piece:
                parts.append(piece)
                put(piece)
            if stop.is_set():
                break
        inputs = max(0, self._llm.n_tokens - len(parts))
        return Completion("".join(parts).strip(), inputs, len(parts))

    def close(self) -> None:
        self._llm.close()
