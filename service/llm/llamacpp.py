"""An in-process local arm: llama-cpp-python over a GGUF file.

Decoding is constrained by a grammar to the prompt's answers, so the query text cannot push the
model outside the label set. One model instance serves one call at a time (llama.cpp contexts
are not thread-safe); calls run in a worker thread so the event loop keeps going.
"""

from __future__ import annotations

import asyncio
import json
import threading
from functools import lru_cache

from service.llm.base import CallRequest, Completion, LLMError
from service.llm.local_models import resolve


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
    ) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise RuntimeError(
                "the llamacpp provider needs llama-cpp-python: `make llama-wheel` builds it "
                "(see README, 'Local models')"
            ) from None
        path, self.chat = resolve(model)
        self._llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        self.max_output_tokens = max_output_tokens
        self._lock = threading.Lock()

    @lru_cache(maxsize=256)  # noqa: B019 - one provider per arm, lives as long as the service
    def _grammar(self, answers: tuple[str, ...]):
        from llama_cpp import LlamaGrammar

        return LlamaGrammar.from_string(answers_grammar(answers), verbose=False)

    def _call(self, request: CallRequest) -> Completion:
        prompt = request.prompt
        grammar = self._grammar(tuple(prompt.answers))
        longest = max(len(self._llm.tokenize(a.encode(), add_bos=False)) for a in prompt.answers)
        max_tokens = max(self.max_output_tokens, longest + 2)
        with self._lock:
            try:
                if self.chat:
                    out = self._llm.create_chat_completion(
                        messages=[{"role": "user", "content": prompt.text}],
                        grammar=grammar,
                        max_tokens=max_tokens,
                        temperature=0.0,
                    )
                    text = out["choices"][0]["message"]["content"] or ""
                else:
                    out = self._llm.create_completion(
                        prompt.text, grammar=grammar, max_tokens=max_tokens, temperature=0.0
                    )
                    text = out["choices"][0]["text"]
            except ValueError as exc:  # e.g. prompt longer than the context window
                raise LLMError(f"llama.cpp rejected the call: {exc}") from None
        usage = out.get("usage") or {}
        return Completion(
            text=text.strip(),
            input_tokens=int(usage.get("prompt_tokens", 0)),
            output_tokens=int(usage.get("completion_tokens", 0)),
        )

    async def complete(self, request: CallRequest) -> Completion:
        return await asyncio.to_thread(self._call, request)

    def close(self) -> None:
        self._llm.close()
