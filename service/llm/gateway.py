"""Calls arms: one entry point that prices the call, times it out and parses the answer.

gateway = Gateway(config)                     # builds one provider per configured arm
result = await gateway.call("gemma-3-270m", request)
result.status, result.prediction, result.cost_usd
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from service.config import AppConfig, ArmConfig
from service.llm.base import CallRequest, LLMError, Provider
from service.tasks import parse_answer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallResult:
    """The outcome of one call, as recorded on the decision row."""

    status: str  # ok | parse_error | llm_error
    prediction: str | None
    raw_output: str | None
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: float
    latency_ms: float
    error: str | None = None


def build_provider(arm: ArmConfig) -> Provider:
    if arm.provider == "replay":
        from service.llm.replay import ReplayProvider

        assert arm.outcomes is not None
        return ReplayProvider(arm.outcomes, arm.model)
    if arm.provider == "llamacpp":
        from service.llm.llamacpp import LlamaCppProvider

        return LlamaCppProvider(arm.model, arm.max_output_tokens, arm.n_threads)
    raise ValueError(f"unknown provider {arm.provider!r}")


class Gateway:
    def __init__(self, config: AppConfig, providers: dict[str, Provider] | None = None) -> None:
        self.arms = {arm.name: arm for arm in config.arms}
        self.providers = (
            providers
            if providers is not None
            else {arm.name: build_provider(arm) for arm in config.arms}
        )

    async def call(self, arm_name: str, request: CallRequest) -> CallResult:
        arm = self.arms[arm_name]
        provider = self.providers[arm_name]
        start = time.perf_counter()
        try:
            completion = await asyncio.wait_for(
                provider.complete(request), timeout=arm.timeout_seconds
            )
        except TimeoutError:
            return self._failed(start, f"timed out after {arm.timeout_seconds:g} s")
        except LLMError as exc:
            return self._failed(start, str(exc))
        except Exception as exc:  # a provider bug must not stop the stream
            log.exception("arm %s failed on %s", arm_name, request.query_id)
            return self._failed(start, f"{type(exc).__name__}: {exc}")
        latency_ms = (time.perf_counter() - start) * 1000
        cost = (
            completion.cost_usd
            if completion.cost_usd is not None
            else arm.cost_usd(completion.input_tokens, completion.output_tokens)
        )
        prediction = parse_answer(completion.text, request.prompt)
        return CallResult(
            status="ok" if prediction is not None else "parse_error",
            prediction=prediction,
            raw_output=completion.text,
            input_tokens=completion.input_tokens,
            output_tokens=completion.output_tokens,
            cost_usd=cost,
            latency_ms=latency_ms,
        )

    @staticmethod
    def _failed(start: float, error: str) -> CallResult:
        return CallResult(
            status="llm_error",
            prediction=None,
            raw_output=None,
            input_tokens=None,
            output_tokens=None,
            cost_usd=0.0,
            latency_ms=(time.perf_counter() - start) * 1000,
            error=error,
        )

    def close(self) -> None:
        for provider in self.providers.values():
            provider.close()
