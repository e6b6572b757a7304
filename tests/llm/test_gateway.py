"""The gateway's resilience: bounded concurrency, timeouts, retries with backoff, circuit
breaker, fallback, costs. Providers here are scripted in-process stand-ins so each behaviour
is exercised exactly; the adapters are tested against real servers in the other files."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from service.config import ArmError, parse_config
from service.llm.base import CallRequest, Completion, LLMError, retry_after_seconds
from service.llm.gateway import CallResult, CircuitBreaker, Gateway
from service.tasks import build_prompt

TASK = {"kind": "classification", "labels": ["yes", "no"]}


class Scripted:
    """Answers from a script: an exception to raise, a Completion, or ("sleep", s, then)."""

    def __init__(self, script=None, default=None, delay: float = 0.0) -> None:
        self.script = list(script or [])
        self.default = default if default is not None else Completion("yes", 10, 2)
        self.delay = delay
        self.calls = 0
        self.running = 0
        self.peak = 0

    async def complete(self, request: CallRequest) -> Completion:
        self.calls += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            step = self.script.pop(0) if self.script else self.default
            if isinstance(step, tuple):
                _, seconds, step = step
                await asyncio.sleep(seconds)
            elif self.delay:
                await asyncio.sleep(self.delay)
            if isinstance(step, Exception):
                raise step
            return step
        finally:
            self.running -= 1

    def close(self) -> None:
        pass


def config(arms: dict[str, dict], **gateway):
    return parse_config(
        {
            "tasks": {"t": TASK},
            "arms": [
                {
                    "name": name,
                    "provider": "replay",
                    "model": name,
                    "outcomes": "unused.jsonl",
                    "retry_backoff_seconds": 0.001,
                    "retry_backoff_max_seconds": 0.01,
                    **extra,
                }
                for name, extra in arms.items()
            ],
            "gateway": gateway,
        }
    )


def request(qid: str = "q1") -> CallRequest:
    from service.config import TaskConfig

    task = TaskConfig(**TASK)
    return CallRequest(qid, build_prompt(task, "Is it raining?", task.labels))


def run(coro):
    return asyncio.run(coro)


def test_retryable_errors_are_retried_until_success() -> None:
    p = Scripted([LLMError("HTTP 503", retryable=True), LLMError("HTTP 429", retryable=True)])
    gw = Gateway(config({"a": {"max_retries": 2}}), {"a": p})
    result = run(gw.call("a", request()))
    assert (result.status, result.prediction, result.attempts, p.calls) == ("ok", "yes", 3, 3)
    assert result.fallback_arm is None and not result.arm_failed


def test_non_retryable_errors_are_not_retried() -> None:
    p = Scripted([LLMError("HTTP 401 invalid key", retryable=False)])
    gw = Gateway(config({"a": {"max_retries": 5}}), {"a": p})
    result = run(gw.call("a", request()))
    assert (result.status, result.attempts, p.calls) == ("llm_error", 1, 1)
    assert result.error == "HTTP 401 invalid key"
    assert result.cost_usd == 0.0 and result.arm_failed


def test_timeouts_are_retried_and_then_fall_back() -> None:
    slow = Scripted(default=("sleep", 5.0, Completion("yes")))
    backup = Scripted(default=Completion("no", 100, 1))
    cfg = config(
        {
            "a": {"timeout_seconds": 0.05, "max_retries": 1, "fallback": "b"},
            "b": {"input_price_per_1m": 2.0, "output_price_per_1m": 10.0},
        }
    )
    gw = Gateway(cfg, {"a": slow, "b": backup})
    result = run(gw.call("a", request()))
    assert slow.calls == 2 and backup.calls == 1
    assert result.status == "ok" and result.prediction == "no"
    assert result.fallback_arm == "b" and result.arm_failed
    assert result.attempts == 3
    assert "timed out after 0.05 s" in result.error
    assert result.cost_usd == pytest.approx((100 * 2.0 + 1 * 10.0) / 1e6)  # the fallback's


def test_fallback_failing_too_is_an_llm_error_naming_both() -> None:
    cfg = config({"a": {"max_retries": 0}, "b": {"max_retries": 0}}, fallback_arm="b")
    gw = Gateway(cfg, {"a": Scripted([LLMError("boom a")]), "b": Scripted([LLMError("boom b")])})
    result = run(gw.call("a", request()))
    assert result.status == "llm_error" and result.fallback_arm == "b"
    assert result.error == "boom a; fallback b: boom b"
    assert result.attempts == 2
    # the default fallback is never its own fallback
    assert cfg.fallback_for("b") is None


def test_a_provider_bug_is_an_llm_error_not_a_crash() -> None:
    gw = Gateway(config({"a": {"max_retries": 3}}), {"a": Scripted([KeyError("choices")])})
    result = run(gw.call("a", request()))
    assert result.status == "llm_error" and result.attempts == 1
    assert "KeyError" in result.error


def test_parse_errors_are_answers_not_failures() -> None:
    gw = Gateway(
        config({"a": {"fallback": "b"}, "b": {}}),
        {"a": Scripted(default=Completion("maybe")), "b": Scripted()},
    )
    result = run(gw.call("a", request()))
    assert result.status == "parse_error" and result.raw_output == "maybe"
    assert result.fallback_arm is None and not result.arm_failed


def test_circuit_breaker_takes_a_failing_arm_out_for_a_cool_down() -> None:
    now = [0.0]
    cfg = config(
        {
            "a": {
                "max_retries": 0,
                "breaker_failures": 3,
                "breaker_cooldown_seconds": 30,
                "fallback": "b",
            },
            "b": {},
        }
    )
    failing = Scripted(default=LLMError("HTTP 500", retryable=True))
    backup = Scripted()
    gw = Gateway(cfg, {"a": failing, "b": backup}, clock=lambda: now[0])

    async def scenario():
        for i in range(3):
            assert gw.available_arms() == ["a", "b"]
            await gw.call("a", request(f"q{i}"))
        assert gw.available_arms() == ["b"]  # open: out of the candidate set
        skipped = await gw.call("a", request("q3"))  # a caller that chose it anyway
        assert skipped.attempts == 1 and skipped.fallback_arm == "b"
        assert "circuit open" in skipped.error and failing.calls == 3

        now[0] = 31.0  # cool-down over: half-open, one probe
        assert gw.available_arms() == ["a", "b"]
        failing.default = ("sleep", 0.05, Completion("no"))
        probe = asyncio.ensure_future(gw.call("a", request("probe")))
        await asyncio.sleep(0.01)
        assert gw.available_arms() == ["b"]  # while the probe is in flight
        other = await gw.call("a", request("during-probe"))
        assert other.fallback_arm == "b"
        assert (await probe).prediction == "no"
        assert gw.breakers["a"].state == "closed" and gw.available_arms() == ["a", "b"]

    run(scenario())


def five_calls_to_a_dead_arm(max_retries: int) -> tuple[Gateway, Scripted, list[CallResult]]:
    """Five calls at once to arm a (one slot, timing out, its circuit opened by one failed
    call), which falls back to b."""
    dead = Scripted(default=("sleep", 5.0, Completion("yes")))
    backup = Scripted(default=Completion("no"))
    cfg = config(
        {
            "a": {
                "max_in_flight": 1,
                "timeout_seconds": 0.05,
                "max_retries": max_retries,
                "retry_backoff_seconds": 0.001,
                "retry_backoff_max_seconds": 0.001,
                "breaker_failures": 1,
                "fallback": "b",
            },
            "b": {},
        }
    )
    gw = Gateway(cfg, {"a": dead, "b": backup})

    async def five():
        return await asyncio.gather(*(gw.call("a", request(f"q{i}")) for i in range(5)))

    return gw, dead, run(five())


def test_calls_queued_behind_a_dead_arm_go_to_the_fallback_once_the_circuit_opens() -> None:
    gw, dead, results = five_calls_to_a_dead_arm(max_retries=0)
    assert dead.calls == 1  # the first timed out and opened the circuit; the rest never went
    assert [r.prediction for r in results] == ["no"] * 5
    assert [r.attempts for r in results] == [2, 1, 1, 1, 1]
    assert gw.breakers["a"].consecutive == 1


def test_a_retry_goes_before_the_calls_queued_behind_it() -> None:
    """With a retry per call, the first call's two attempts open the circuit; the four
    queued behind it never reach the arm (each waited a whole timeout at the dead arm first
    when a retry queued behind them)."""
    _, dead, results = five_calls_to_a_dead_arm(max_retries=1)
    assert dead.calls == 2
    assert [r.prediction for r in results] == ["no"] * 5
    assert [r.attempts for r in results] == [3, 1, 1, 1, 1]


def test_a_failed_probe_opens_the_circuit_again() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, cooldown=10, clock=lambda: now[0])
    assert breaker.acquire() and not breaker.failure()
    assert breaker.acquire() and breaker.failure()
    assert breaker.state == "open" and not breaker.acquire()
    now[0] = 10.5
    assert breaker.state == "half_open" and breaker.acquire() and not breaker.acquire()
    assert breaker.failure()  # the probe failed
    assert breaker.state == "open" and breaker.times_opened == 2
    now[0] = 21.0
    assert breaker.acquire()
    breaker.success()
    assert breaker.state == "closed"


def test_a_call_queued_while_the_circuit_was_closed_never_reaches_it_half_open() -> None:
    """Calls 2 and 3 passed the closed circuit and queue for the arm's one slot; call 1 fails
    and opens it; by the time they get the slot it has cooled down (half-open): neither is
    the probe, so neither is sent, and the probe that comes after is the one call sent."""
    now = [0.0]

    def clock() -> float:  # each look at the clock is 10 s later: any cool-down has passed
        now[0] += 10
        return now[0]

    arm = Scripted([("sleep", 0.02, LLMError("HTTP 503", retryable=True))], delay=0.02)
    cfg = config(
        {
            "a": {
                "max_in_flight": 1,
                "max_retries": 0,
                "breaker_failures": 1,
                "breaker_cooldown_seconds": 5,
                "fallback": "b",
            },
            "b": {},
        }
    )
    gw = Gateway(cfg, {"a": arm, "b": Scripted(default=Completion("no"))}, clock=clock)

    async def three_then_the_probe():
        queued = await asyncio.gather(*(gw.call("a", request(f"q{i}")) for i in range(3)))
        return queued, await gw.call("a", request("probe"))

    queued, probe = run(three_then_the_probe())
    assert [r.fallback_arm for r in queued] == ["b", "b", "b"]
    assert probe.fallback_arm is None and probe.prediction == "yes"
    assert arm.calls == 2  # call 1 and the probe: none queued beside a half-open circuit
    assert gw.breakers["a"].state == "closed"


def test_every_circuit_open_still_offers_candidates() -> None:
    gw = Gateway(
        config({"a": {"max_retries": 0, "breaker_failures": 1}}),
        {"a": Scripted([LLMError("x")])},
    )
    run(gw.call("a", request()))
    assert gw.breakers["a"].state == "open"
    assert gw.available_arms() == ["a"]


def test_in_flight_calls_are_bounded_per_arm_and_overall() -> None:
    a, b = Scripted(delay=0.03), Scripted(delay=0.03)
    gw = Gateway(
        config({"a": {"max_in_flight": 4}, "b": {"max_in_flight": 4}}, max_in_flight=6),
        {"a": a, "b": b},
    )

    async def many():
        calls = [gw.call("a" if i % 2 else "b", request(f"q{i}")) for i in range(40)]
        return await asyncio.gather(*calls)

    results = run(many())
    assert all(r.status == "ok" for r in results)
    assert a.peak <= 4 and b.peak <= 4
    assert gw.peak_in_flight == 6 == a.peak + b.peak  # the overall bound, reached
    assert gw.in_flight == 0

    alone = Scripted(delay=0.03)
    gw = Gateway(config({"a": {"max_in_flight": 4}}, max_in_flight=64), {"a": alone})

    async def twenty():
        return await asyncio.gather(*(gw.call("a", request(f"q{i}")) for i in range(20)))

    run(twenty())
    assert alone.peak == 4  # the arm's own bound, reached


def test_latency_is_the_call_not_its_wait_for_a_free_slot() -> None:
    """Four calls through one slot: each takes 0.1 s, the last waits 0.3 s for its turn. The
    recorded latency is the model's time, whatever the queue."""
    p = Scripted(delay=0.1)
    gw = Gateway(config({"a": {"max_in_flight": 1}}), {"a": p})

    async def four():
        return await asyncio.gather(*(gw.call("a", request(f"q{i}")) for i in range(4)))

    results = run(four())
    latencies = [r.latency_ms for r in results]
    assert p.peak == 1
    assert all(95 <= ms < 200 for ms in latencies), latencies
    # the wait is recorded apart: 0, 0.1, 0.2, 0.3 s queued for the one slot
    waits = sorted(r.wait_ms for r in results)
    assert waits[0] < 50 and all(
        95 * k <= w < 95 * k + 100 for k, w in enumerate(waits[1:], start=1)
    ), waits


def test_a_providers_own_queue_counts_as_waiting() -> None:
    """A provider that queues a request before its model takes it (a local model serves one
    call at a time) says how long: that time is the call's wait, not its latency."""

    class Queued(Scripted):
        async def complete(self, request: CallRequest) -> Completion:
            await asyncio.sleep(0.2)  # behind the calls before it, inside the provider
            done = await super().complete(request)
            return replace(done, waited_ms=200.0)

    gw = Gateway(config({"a": {}}), {"a": Queued(delay=0.1)})
    result = run(gw.call("a", request()))
    assert 95 <= result.latency_ms < 200 and result.wait_ms >= 195, result


def test_many_calls_run_concurrently_not_serially() -> None:
    p = Scripted(delay=0.1)
    gw = Gateway(config({"a": {"max_in_flight": 64}}), {"a": p})

    async def many():
        return await asyncio.gather(*(gw.call("a", request(f"q{i}")) for i in range(50)))

    run(many())
    assert p.peak == 50


def test_backoff_is_exponential_with_full_jitter_and_honours_retry_after() -> None:
    """The waits between a call's attempts, as the gateway sleeps them: after the n-th failed
    attempt a uniform draw below min(max, base·2^(n-1)), at least the server's Retry-After,
    never more than the max."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    arm = {"retry_backoff_seconds": 0.5, "retry_backoff_max_seconds": 4.0, "max_retries": 5}
    caps = [0.5, 1.0, 2.0, 4.0, 4.0]
    waits: list[list[float]] = [[] for _ in caps]
    for _ in range(300):
        slept.clear()
        failing = Scripted(default=LLMError("HTTP 503", retryable=True))
        result = run(Gateway(config({"a": arm}), {"a": failing}, sleep=sleep).call("a", request()))
        assert result.attempts == failing.calls == 6
        assert len(slept) == 5  # one wait between each two attempts, none after the last
        for seen, wait in zip(waits, slept, strict=True):
            seen.append(wait)
    for seen, cap in zip(waits, caps, strict=True):
        assert min(seen) >= 0 and max(seen) <= cap
        assert max(seen) > 0.8 * cap  # spread over the whole range: jitter

    def waits_for(retry_after: float) -> list[float]:
        slept.clear()
        script = [LLMError("HTTP 429", retryable=True, retry_after=retry_after)]
        run(Gateway(config({"a": arm}), {"a": Scripted(script)}, sleep=sleep).call("a", request()))
        return list(slept)

    assert waits_for(3.0) == [3.0]
    assert waits_for(60.0) == [4.0]  # capped


def test_only_retryable_errors_wait_and_the_last_attempt_does_not() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    script = [LLMError("HTTP 503", retryable=True), LLMError("HTTP 400", retryable=False)]
    gw = Gateway(config({"a": {"max_retries": 4}}), {"a": Scripted(script)}, sleep=sleep)
    result = run(gw.call("a", request()))
    assert (result.status, result.attempts, result.error) == ("llm_error", 2, "HTTP 400")
    assert len(slept) == 1


def test_a_retry_the_circuit_refuses_keeps_the_real_error_and_counts_what_was_sent() -> None:
    """A call backing off before its retry while another call opens the arm's circuit: the
    retry is not sent, the recorded attempts are those sent, and the error is the arm's."""
    backing_off = asyncio.Event()
    release = asyncio.Event()

    async def sleep(seconds: float) -> None:
        backing_off.set()
        await release.wait()

    cfg = config({"a": {"max_retries": 1, "breaker_failures": 1}})
    script = [LLMError("HTTP 503", retryable=True), LLMError("HTTP 401", retryable=False)]
    gw = Gateway(cfg, {"a": Scripted(script)}, sleep=sleep)

    async def scenario():
        first = asyncio.ensure_future(gw.call("a", request("q1")))
        await backing_off.wait()
        second = await gw.call("a", request("q2"))  # fails, and opens the circuit
        release.set()
        return await first, second

    first, second = run(scenario())
    assert (second.error, second.attempts) == ("HTTP 401", 1)
    assert gw.breakers["a"].state == "open"
    assert first.status == "llm_error" and first.attempts == 1
    assert first.error == "HTTP 503; retry refused: a: circuit open"


def test_retry_after_headers() -> None:
    assert retry_after_seconds({"Retry-After": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_seconds({}) is None


def test_cost_is_priced_from_usage_and_config() -> None:
    cfg = config({"a": {"input_price_per_1m": 0.15, "output_price_per_1m": 0.6}})
    gw = Gateway(cfg, {"a": Scripted(default=Completion("yes", 1200, 3))})
    result = run(gw.call("a", request()))
    assert result.input_tokens == 1200 and result.output_tokens == 3
    assert result.cost_usd == pytest.approx((1200 * 0.15 + 3 * 0.6) / 1e6)


def test_score_mode_scores_are_carried_to_the_result() -> None:
    scores = {"yes": -0.2, "no": -1.7}
    gw = Gateway(config({"a": {}}), {"a": Scripted(default=Completion("yes", 5, 0, scores=scores))})
    result = run(gw.call("a", request()))
    assert result.prediction == "yes" and result.answer_scores == scores


def test_arms_built_before_one_that_cannot_be_are_closed(tmp_path, monkeypatch) -> None:
    """An arm that cannot be built (its API key unset) fails the gateway; the arms built
    before it are closed (a local model's memory freed), not left to the garbage collector."""
    pytest.importorskip("openai")
    from tests.helpers import arm_with_an_unset_key, record_closes

    closed = record_closes(monkeypatch)
    outcomes = tmp_path / "o.jsonl"
    outcomes.write_text("")
    first = {"name": "first", "provider": "replay", "model": "first", "outcomes": str(outcomes)}
    broken = parse_config(
        {"tasks": {"t": TASK}, "arms": [first, arm_with_an_unset_key(monkeypatch)]}
    )
    with pytest.raises(ArmError, match="METALLM_TEST_UNSET_KEY is not set"):
        Gateway(broken)
    assert closed == ["first"]
