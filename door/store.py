"""The door's decisions stored by group commit: one append to the learning log for all the
decisions whose calls ended while the one before was being stored.

Each request's thread hands its decision over; the first that finds no group being stored
stores every decision waiting in one transaction (:meth:`Decider.store`) and tells each; the
others wait for that, and the first of them to wake stores the next group. Alone, a decision
is stored at once by its own thread; under load, many share one transaction, so the learning
log's lock is taken once for them (not once per request) and the door stores on one database
connection at a time, whatever its number of requests in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from service.decision import Decision
from service.pipeline import Decider
from service.storage import unreachable

log = logging.getLogger(__name__)

#: the most decisions stored in one transaction
MAX_GROUP = 256
#: the backoff between tries of a group Postgres failed to store: the first, the longest
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 2.0


class StoreUnavailable(Exception):
    """Postgres stayed out of reach while the door retried storing a decision."""


class StoreClosed(Exception):
    """The door is stopping: a decision handed over now is not stored."""


@dataclass(eq=False)
class _Waiting:
    """A decision handed over to be stored, and what became of it."""

    decision: Decision
    failed: bool
    done: bool = False
    stored: bool = False
    error: BaseException | None = None


class GroupStore:
    def __init__(self, decider: Decider, retry_for_s: float = 30.0) -> None:
        self.decider = decider
        self.retry_for_s = retry_for_s
        self._waiting: list[_Waiting] = []
        self._leading = False  # a request's thread is storing a group
        self._closed = False
        self._turn = threading.Condition()

    def store(self, decision: Decision, failed: bool) -> bool:
        """Store a decision (its chosen arm ``failed`` or not) with the others waiting; whether
        it was stored (False: another instance stored this query's decision first).
        :class:`StoreClosed` once :meth:`close` began.

        The calling thread stores the group itself when no other is storing one (no hand-over
        to another thread: a decision alone is stored at once); else it waits, and the next
        group, taken when the one being stored commits, holds every decision that waited."""
        mine = _Waiting(decision, failed)
        with self._turn:
            if self._closed:
                raise StoreClosed(f"the door stopped: {decision.query_id!r} not stored")
            self._waiting.append(mine)
            while not mine.done:
                if self._leading:
                    self._turn.wait()
                    continue
                self._leading = True
                group = self._take()
                self._turn.release()
                try:
                    self._store(group)
                finally:
                    self._turn.acquire()
                    self._leading = False
                    self._turn.notify_all()
        if mine.error is not None:
            raise mine.error
        return mine.stored

    def _take(self) -> list[_Waiting]:
        """The next group, in the order handed over: at most :data:`MAX_GROUP`, and one
        decision per query id (a second one waits for the next group, to see its outcome)."""
        group: list[_Waiting] = []
        ids: set[str] = set()
        left: list[_Waiting] = []
        for item in self._waiting:
            qid = item.decision.query_id
            if len(group) < MAX_GROUP and qid not in ids:
                group.append(item)
                ids.add(qid)
            else:
                left.append(item)
        self._waiting = left
        return group

    def _store(self, group: list[_Waiting]) -> None:
        """Store a group; a transient failure (Postgres out of reach) is retried with backoff
        for up to ``retry_for_s``: the calls are paid for. Every item of the group is told."""
        give_up, pause = time.monotonic() + self.retry_for_s, RETRY_FIRST_S
        while True:
            try:
                stored = self.decider.store(
                    [w.decision for w in group], [w.decision.query_id for w in group if w.failed]
                )
                break
            except BaseException as exc:
                retry = unreachable(exc) and time.monotonic() + pause < give_up
                log.warning(
                    "storing %d decisions of the HTTP door failed%s: %s",
                    len(group),
                    f" (again in {pause:.1f} s)" if retry else "",
                    exc,
                )
                if retry:
                    time.sleep(pause)
                    pause = min(pause * 2, RETRY_MAX_S)
                    continue
                failure = StoreUnavailable(f"storing failed: {exc}") if unreachable(exc) else exc
                for w in group:
                    w.error, w.done = failure, True
                return
        for w in group:
            w.stored, w.done = w.decision.query_id in stored, True

    def close(self) -> None:
        """Refuse new decisions (:meth:`store` raises :class:`StoreClosed`) and wait (up to a
        minute) until those handed over before are stored."""
        with self._turn:
            self._closed = True
            self._turn.wait_for(lambda: not self._waiting and not self._leading, 60)
