"""How the consumers tell a failure: transient (Postgres or the broker out of reach: retry the
same events later) or about the events themselves; a short reason for the dead-letter topic;
and the backoff between retries.
"""

from __future__ import annotations

from kafka.errors import KafkaError
from tenacity import RetryCallState
from tenacity.wait import wait_exponential

from service.storage import unreachable


def is_transient(exc: BaseException) -> bool:
    """Whether a failure is about reaching Postgres or the broker (retrying the same events
    later can succeed) rather than about the events themselves."""
    return unreachable(exc) or isinstance(exc, KafkaError | TimeoutError)


def describe(exc: BaseException) -> str:
    """A short reason for a failure: the driver's message, without SQL or bound values."""
    inner = getattr(exc, "orig", None) or exc
    text = " ".join(str(inner).split())
    return f"{type(inner).__name__}: {text}"[:1000]


class Backoff:
    """The wait after each of a run of consecutive failures: ``first`` seconds, doubling up to
    ``cap`` (tenacity's exponential wait); a success starts the run again.

    >>> b = Backoff(0.5, 3.0)
    >>> [b.next() for _ in range(5)]
    [0.5, 1.0, 2.0, 3.0, 3.0]
    >>> b.reset(); b.next()
    0.5
    """

    def __init__(self, first: float, cap: float) -> None:
        self._wait = wait_exponential(multiplier=first, max=cap)
        self.failures = 0

    def next(self) -> float:
        """Count one more failure and return how long to wait before trying again."""
        self.failures += 1
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
        state.attempt_number = self.failures
        return self._wait(state)

    def reset(self) -> None:
        self.failures = 0
