"""The door's decisions stored by group commit: one append to the learning log for all the
decisions whose calls ended while the one before was being stored.

Each request's thread hands its decision over and waits for it to be stored; one thread takes
every decision waiting, stores them in one transaction (:meth:`Decider.store`), and answers
each. Alone, a decision is stored at once; under load, many share one transaction, so the
learning log's lock is taken once for them (not once per request) and the door holds one
database connection for storing, whatever its number of requests in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

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


class GroupStore:
    def __init__(self, decider: Decider, retry_for_s: float = 30.0) -> None:
        self.decider = decider
        self.retry_for_s = retry_for_s
        self._queue: queue.Queue[tuple[Decision, bool, Future[bool]] | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="metallm-door-store", daemon=True)
        self._thread.start()

    def store(self, decision: Decision, failed: bool) -> bool:
        """Store a decision (its chosen arm ``failed`` or not) with the others waiting; whether
        it was stored (False: another instance stored this query's decision first).
        :class:`StoreClosed` once :meth:`close` began."""
        done: Future[bool] = Future()
        with self._lock:  # handed over before the stop mark, or refused
            if self._closed:
                raise StoreClosed(f"the door stopped: {decision.query_id!r} not stored")
            self._queue.put((decision, failed, done))
        return done.result()

    def _run(self) -> None:
        held: list[tuple[Decision, bool, Future[bool]]] = []  # an id already in the group
        while True:
            first = held.pop(0) if held else self._queue.get()
            if first is None:
                return
            group, ids = [first], {first[0].query_id}
            while len(group) < MAX_GROUP:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this group
                    break
                if item[0].query_id in ids:  # stored after this group, to see its outcome
                    held.append(item)
                    continue
                group.append(item)
                ids.add(item[0].query_id)
            self._store(group)

    def _store(self, group: list[tuple[Decision, bool, Future[bool]]]) -> None:
        """Store a group; a transient failure (Postgres out of reach) is retried with backoff
        for up to ``retry_for_s``: the calls are paid for."""
        give_up, pause = time.monotonic() + self.retry_for_s, RETRY_FIRST_S
        while True:
            try:
                stored = self.decider.store(
                    [d for d, _, _ in group], [d.query_id for d, failed, _ in group if failed]
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
                for _, _, done in group:  # every request of the group is told
                    done.set_exception(failure)
                return
        for d, _, done in group:
            done.set_result(d.query_id in stored)

    def close(self) -> None:
        """Store what is waiting, then stop: :meth:`store` refuses from now on."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(60)
