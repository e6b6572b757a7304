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
from concurrent.futures import Future

from service.decision import Decision
from service.pipeline import Decider

log = logging.getLogger(__name__)

#: the most decisions stored in one transaction
MAX_GROUP = 256


class GroupStore:
    def __init__(self, decider: Decider) -> None:
        self.decider = decider
        self._queue: queue.Queue[tuple[Decision, bool, Future[bool]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="metallm-door-store", daemon=True)
        self._thread.start()

    def store(self, decision: Decision, failed: bool) -> bool:
        """Store a decision (its chosen arm ``failed`` or not) with the others waiting; whether
        it was stored (False: another instance stored this query's decision first)."""
        done: Future[bool] = Future()
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
        try:
            stored = self.decider.store(
                [d for d, _, _ in group], [d.query_id for d, failed, _ in group if failed]
            )
        except BaseException as exc:  # every request of the group is told
            log.warning("storing %d decisions of the HTTP door failed: %s", len(group), exc)
            for _, _, done in group:
                done.set_exception(exc)
            return
        for d, _, done in group:
            done.set_result(d.query_id in stored)

    def close(self) -> None:
        """Store what is waiting, then stop."""
        self._queue.put(None)
        self._thread.join(60)
