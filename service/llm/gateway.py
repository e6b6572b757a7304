"""Calls arms: one entry point that bounds, times out, retries, falls back, prices and parses.

gateway = Gateway(config)                     # builds one provider per configured arm
arms = gateway.available_arms()               # arms whose circuit breaker lets calls through
result = await gateway.call("gemma-3-270m", request)
result.status, result.prediction, result.cost_usd, result.attempts, result.fallback_arm

For each call: at most ``max_in_flight`` calls per arm (a call keeps its arm's slot through
its retries) and ``gateway.max_in_flight`` requests overall run at once; each attempt has
``timeout_seconds``; timeouts, lost connections, 429 and 5xx are retried up to
``max_retries`` times after ``uniform(0, min(max, base·2^n))`` seconds (full jitter; at
least the server's Retry-After, capped at the max); other errors are not retried.
``breaker_failures`` consecutive failed calls open the arm's circuit for
``breaker_cooldown_seconds``: it leaves the candidate set, calls to it go straight to the
fallback; after the cool-down one probe call decides whether it closes again.
When the arm fails (or its circuit is open) the fallback arm answers, once, with its own
limits. API keys never reach a log line or a result: errors are redacted by the adapters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential

from service.config import AppConfig, ArmConfig, ArmError
from service.decision import arm_failed
from service.llm.base import CallRequest, Completion, InputTooLong, LLMError, Provider
from service.llm.streaming import Relay, consume, failed, streams
from service.tasks import parse_answer

log = logging.getLogger(__name__)


class CircuitOpen(LLMError):
    """The arm's circuit is open: the call was not sent."""


@dataclass(frozen=True)
class CallResult:
    """The outcome of one call, as recorded on the decision row.

    ``status`` and ``prediction`` describe the answer served (from the fallback when the chosen
    arm failed); an open task's answer is ``raw_output`` (``prediction`` None, ``status`` ok).
    ``latency_ms`` is the call's own time (its attempts, the back-off between them and the
    fallback's); ``wait_ms`` the time it queued for a free slot (the arm's and the gateway's
    ``max_in_flight``, a local model's one call at a time). ``attempts`` counts every request
    sent for it, retries and fallback included; ``fallback_arm`` is set when the chosen arm
    failed and the fallback was asked; ``error`` then says why the chosen arm failed.
    """

    status: str  # ok | parse_error | llm_error | input_too_long
    prediction: str | None
    raw_output: str | None
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: float
    latency_ms: float
    error: str | None = None
    attempts: int = 1
    fallback_arm: str | None = None
    answer_scores: dict[str, float] | None = None
    wait_ms: float = 0.0

    @property
    def arm_failed(self) -> bool:
        """Whether the arm the policy chose failed (whatever the fallback then did)."""
        return arm_failed(self.status, self.fallback_arm)


class CircuitBreaker:
    """Closed → (``failures`` consecutive failed calls) → open for ``cooldown`` seconds →
    half-open: one probe call; success closes it, failure opens it again."""

    def __init__(
        self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probing = False
        self.times_opened = 0

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at < self.cooldown:
            return "open"
        return "half_open"

    def available(self) -> bool:
        """Whether the arm belongs in the policy's candidate set now."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self.probing)

    def admits(self, probe: bool) -> bool:
        """Whether a call acquired earlier may still be sent (each attempt asks, after waiting
        for its slot): the probe while half-open; any other call only while closed, so one
        that passed a closed circuit never reaches a half-open arm beside the probe.

        >>> now = [0.0]
        >>> breaker = CircuitBreaker(failures=1, cooldown=10, clock=lambda: now[0])
        >>> breaker.acquire(), breaker.admits(probe=False)  # acquired while closed
        (True, True)
        >>> breaker.failure(); now[0] = 11.0  # opened by another call, then cooled down
        True
        >>> breaker.acquire(), breaker.admits(probe=True), breaker.admits(probe=False)
        (True, True, False)
        """
        state = self.state
        return state == "closed" or (probe and state == "half_open" and self.probing)

    def acquire(self) -> bool:
        """Whether a call may go to the arm now (in half-open, only the one probe)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.consecutive = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> bool:
        """Record a failed call; returns True when this opened the circuit."""
        self.consecutive += 1
        was_probe = self.probing
        self.probing = False
        if was_probe or (self.opened_at is None and self.consecutive >= self.failures):
            self.opened_at = self.clock()
            self.times_opened += 1
            return True
        return False


def _retryable(exc: BaseException) -> bool:
    """Timeouts, lost connections, 429 and 5xx (what the adapters mark retryable); a call the
    gateway refused (its circuit open) is not an attempt and is not retried."""
    return isinstance(exc, LLMError) and exc.retryable and not isinstance(exc, CircuitOpen)


class wait_retry_after(wait_base):  # noqa: N801 - named like tenacity's own wait strategies
    """``wait``, but at least the Retry-After the failed attempt's server asked for, and never
    more than ``cap`` seconds."""

    def __init__(self, wait: wait_base, cap: float) -> None:
        self.wait = wait
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = self.wait(retry_state)
        failed = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(failed, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.cap)


def backoff(arm: ArmConfig) -> wait_retry_after:
    """The wait before each retry of ``arm``: after the n-th failed attempt, a uniform draw
    from ``[0, min(retry_backoff_max_seconds, retry_backoff_seconds·2^(n-1))]`` (full
    jitter), at least the server's Retry-After, capped at ``retry_backoff_max_seconds``."""
    full_jitter = wait_random_exponential(
        multiplier=arm.retry_backoff_seconds, max=arm.retry_backoff_max_seconds
    )
    return wait_retry_after(full_jitter, arm.retry_backoff_max_seconds)


@dataclass
class _Latency:
    """A call's latency: the time since it started, less the time it waited for a free slot
    (the model's and the network's time, retries and back-off included)."""

    start: float = field(default_factory=time.perf_counter)
    queued: float = 0.0

    def ms(self) -> float:
        return (time.perf_counter() - self.start - self.queued) * 1000

    def wait_ms(self) -> float:
        return self.queued * 1000


@dataclass
class _ArmOutcome:
    completion: Completion | None
    error: str | None
    attempts: int
    too_long: bool = False  # the arm refused the prompt: longer than its context window


def _too_long(outcome: _ArmOutcome, latency: _Latency) -> CallResult:
    """A call the chosen arm refused for the prompt's length: no fallback (the prompt is the
    problem, not the arm), no cost, and nothing for the policy to learn."""
    return CallResult(
        status="input_too_long",
        prediction=None,
        raw_output=None,
        input_tokens=None,
        output_tokens=None,
        cost_usd=0.0,
        latency_ms=latency.ms(),
        error=outcome.error,
        attempts=outcome.attempts,
        wait_ms=latency.wait_ms(),
    )


def build_provider(arm: ArmConfig) -> Provider:
    """The provider for one arm; a missing optional SDK raises a message naming its extra."""
    if arm.provider == "replay":
        from service.llm.replay import ReplayProvider

        assert arm.outcomes is not None
        return ReplayProvider(arm.outcomes, arm.model)
    if arm.provider == "llamacpp":
        from service.llm.llamacpp import LlamaCppProvider

        return LlamaCppProvider(
            arm.model,
            arm.max_output_tokens,
            arm.n_threads,
            n_ctx=arm.n_ctx,
            answer_mode=arm.answer_mode,
            calibrate=arm.calibrate,
        )
    if arm.provider == "openai":
        from service.llm.openai_api import OpenAIProvider

        return OpenAIProvider(arm)
    if arm.provider == "anthropic":
        from service.llm.anthropic_api import AnthropicProvider

        return AnthropicProvider(arm)
    if arm.provider == "bedrock":
        from service.llm.bedrock import BedrockProvider

        return BedrockProvider(arm)
    raise ValueError(f"unknown provider {arm.provider!r}")


class Gateway:
    def __init__(
        self,
        config: AppConfig,
        providers: dict[str, Provider] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.arms = {arm.name: arm for arm in config.arms}
        self.providers = providers if providers is not None else self._build(config)
        self.breakers = {
            arm.name: CircuitBreaker(arm.breaker_failures, arm.breaker_cooldown_seconds, clock)
            for arm in config.arms
        }
        self._sleep = sleep  # how the back-off between attempts waits
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arm_slots: dict[str, asyncio.Semaphore] = {}
        self._slots: asyncio.Semaphore | None = None
        self.in_flight = 0
        self.peak_in_flight = 0

    @staticmethod
    def _build(config: AppConfig) -> dict[str, Provider]:
        """One provider per arm; if one cannot be built (a missing key or extra), those built
        before it are closed (a local model's memory is freed) before the error goes on."""
        built: dict[str, Provider] = {}
        try:
            for arm in config.arms:
                try:
                    built[arm.name] = build_provider(arm)
                except (RuntimeError, ValueError, OSError) as exc:  # told as the arm's, once
                    raise ArmError(f"arm {arm.name!r} cannot start: {exc}") from exc
        except BaseException:
            for provider in built.values():
                try:
                    provider.close()
                except Exception:  # the arm that could not be built is the error to tell
                    log.warning("closing a provider failed", exc_info=True)
            raise
        return built

    # ------------------------------------------------------------------ candidate set
    def available_arms(self) -> list[str]:
        """Configured arms whose circuit is not open, in config order. When every circuit is
        open, all arms (a policy needs candidates; the calls then fail fast)."""
        arms = [name for name in self.arms if self.breakers[name].available()]
        if not arms:
            log.warning("every arm's circuit breaker is open; offering all arms")
            return list(self.arms)
        return arms

    # ------------------------------------------------------------------ calling
    def _limits(self) -> tuple[dict[str, asyncio.Semaphore], asyncio.Semaphore]:
        """Semaphores bound to the running loop (made anew if the loop changed)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._slots is None:
            self._loop = loop
            self._arm_slots = {
                name: asyncio.Semaphore(arm.max_in_flight) for name, arm in self.arms.items()
            }
            self._slots = asyncio.Semaphore(self.config.gateway.max_in_flight)
        return self._arm_slots, self._slots

    async def _attempt(
        self, name: str, request: CallRequest, latency: _Latency, probe: bool, relay: Relay | None
    ) -> Completion:
        """One request, in one of the gateway's slots (the caller holds the arm's); the time
        it waits for the slot is kept out of ``latency``. ``probe``: the call is the arm's
        half-open probe; ``relay``: it is streamed to it."""
        arm = self.arms[name]
        _, slots = self._limits()
        waiting = time.perf_counter()
        async with slots:
            latency.queued += time.perf_counter() - waiting
            if not self.breakers[name].admits(probe):  # opened while this call was queued
                raise CircuitOpen(f"{name}: circuit open")
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            provider = self.providers[name]
            work = (
                provider.complete(request) if relay is None else consume(provider, request, relay)
            )
            try:
                completion = await asyncio.wait_for(work, timeout=arm.timeout_seconds)
                latency.queued += completion.waited_ms / 1000  # a local model's own queue
                return completion
            except TimeoutError:
                raise failed(f"timed out after {arm.timeout_seconds:g} s", relay, True) from None
            except LLMError:
                raise
            except Exception as exc:  # a provider bug must not stop the stream
                log.exception("arm %s failed on %s", name, request.query_id)
                raise LLMError(f"{type(exc).__name__}: {exc}") from None
            finally:
                self.in_flight -= 1

    async def _call_arm(
        self, name: str, request: CallRequest, latency: _Latency, relay: Relay | None = None
    ) -> _ArmOutcome:
        """One arm, with retries, behind its circuit breaker (streamed to ``relay`` if the arm
        can stream the prompt)."""
        arm = self.arms[name]
        if relay is not None and not streams(self.providers[name], request.prompt):
            relay = None
        breaker = self.breakers[name]
        if not breaker.acquire():
            return _ArmOutcome(None, f"{name}: circuit open", 0)
        probe = breaker.state == "half_open"  # acquired as the probe (only it gets through)
        retried: list[str] = []  # the error of each attempt that was retried

        def note(state: RetryCallState) -> None:
            retried.append(str(state.outcome.exception() if state.outcome else None))

        retrying = AsyncRetrying(
            stop=stop_after_attempt(arm.max_retries + 1),
            wait=backoff(arm),
            retry=retry_if_exception(_retryable),
            before_sleep=note,
            sleep=self._sleep,
            reraise=True,
        )
        arm_slots, _ = self._limits()
        waiting = time.perf_counter()
        try:
            # The arm's slot is held from the first attempt to the last: a retry goes before
            # the calls queued behind this one, so a dead arm costs one call's attempts
            # before its circuit opens, not an attempt of every call queued meanwhile.
            async with arm_slots[name]:
                latency.queued += time.perf_counter() - waiting
                completion = await retrying(self._attempt, name, request, latency, probe, relay)
        except CircuitOpen as exc:  # not sent: says nothing new about the arm
            # other calls opened the circuit while this one backed off: keep the real error
            reason = f"{retried[-1]}; retry refused: {exc}" if retried else str(exc)
            return _ArmOutcome(None, reason, len(retried))
        except InputTooLong as exc:  # the arm answered: it is up, the prompt was too long
            breaker.success()
            return _ArmOutcome(None, str(exc), len(retried) + 1, too_long=True)
        except LLMError as exc:
            if breaker.failure():
                log.warning(
                    "arm %s: circuit opened for %g s after %d failed calls (last: %s)",
                    name,
                    arm.breaker_cooldown_seconds,
                    breaker.consecutive,
                    exc,
                )
            return _ArmOutcome(None, str(exc), len(retried) + 1)
        breaker.success()
        return _ArmOutcome(completion, None, len(retried) + 1)

    async def call(
        self, arm_name: str, request: CallRequest, relay: Relay | None = None
    ) -> CallResult:
        """Call the chosen arm (falling back if it fails before streaming to ``relay``) and
        parse the answer."""
        latency = _Latency()
        outcome = await self._call_arm(arm_name, request, latency, relay)
        answered_by, fallback = arm_name, None
        error = outcome.error
        attempts = outcome.attempts
        if outcome.too_long:
            return _too_long(outcome, latency)
        if outcome.completion is None:
            broken = relay is not None and relay.sent  # part of the answer went out
            fallback = None if broken else self.config.fallback_for(arm_name)
            log.warning(
                "arm %s failed on %s after %d attempts: %s%s",
                arm_name,
                request.query_id,
                outcome.attempts,
                outcome.error,
                f"; falling back to {fallback}" if fallback else "",
            )
            if fallback is not None:
                second = await self._call_arm(fallback, request, latency, relay)
                attempts += second.attempts
                if second.completion is None:
                    error = f"{outcome.error}; fallback {fallback}: {second.error}"
                outcome, answered_by = second, fallback
        if outcome.completion is None:
            return CallResult(
                status="llm_error",
                prediction=None,
                raw_output=None,
                input_tokens=None,
                output_tokens=None,
                cost_usd=0.0,  # a failed request returns no usage: nothing is billed
                latency_ms=latency.ms(),
                error=error,
                attempts=attempts,
                fallback_arm=fallback,
                wait_ms=latency.wait_ms(),
            )
        return self._answered(
            answered_by, request, outcome.completion, latency, attempts, fallback, error
        )

    def _answered(
        self,
        answered_by: str,
        request: CallRequest,
        completion: Completion,
        latency: _Latency,
        attempts: int,
        fallback: str | None,
        error: str | None,
    ) -> CallResult:
        """The result of a call an arm answered: priced, and parsed (but an open prompt's)."""
        arm = self.arms[answered_by]
        cost = (
            completion.cost_usd
            if completion.cost_usd is not None
            else arm.cost_usd(completion.input_tokens, completion.output_tokens)
        )
        # an open prompt's answer is the text itself (raw_output): nothing to parse
        prediction = None if request.prompt.open else parse_answer(completion.text, request.prompt)
        return CallResult(
            status="ok" if prediction is not None or request.prompt.open else "parse_error",
            prediction=prediction,
            raw_output=completion.text,
            input_tokens=completion.input_tokens,
            output_tokens=completion.output_tokens,
            cost_usd=cost,
            latency_ms=latency.ms(),
            error=error,
            attempts=attempts,
            fallback_arm=fallback,
            answer_scores=completion.scores,
            wait_ms=latency.wait_ms(),
        )

    async def aclose(self) -> None:
        """Close the providers' async HTTP clients on the loop that used them."""
        for provider in self.providers.values():
            aclose = getattr(provider, "aclose", None)
            if aclose is not None:
                await aclose()

    def close(self) -> None:
        for provider in self.providers.values():
            provider.close()
