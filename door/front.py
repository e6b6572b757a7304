"""What the door does for a request, over the service's core: answer a query once per id (on
any instance), apply feedback, read a decision. Blocking; the server runs it on its threads.

A query id is reserved in Postgres before its arm is called (:mod:`service.log.requests`): a
retry with the same id and body waits for the call in flight or returns the stored decision; a
body of its own under that id is refused (:class:`Conflict`). A reservation is a lease of the
request timeout and :data:`LEASE_MARGIN_S`, renewed while its call runs: if its instance dies,
a retry takes it over once the lease ends, and never while the call is alive.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.engine import Connection

from door.shapes import ChatRequest
from door.store import GroupStore, StoreClosed, StoreUnavailable
from service.events import InvalidEvent, LabelEvent, QueryEvent
from service.llm.streaming import Relay
from service.log.decisions import stored_queries
from service.log.requests import lease_ended, public_decision, release, renew, reserve
from service.log.rows import PublicDecision
from service.pipeline import Decider, Learner
from service.query_checks import difference, query_of

log = logging.getLogger(__name__)

#: how much longer than the request timeout a reservation lasts (a call may end just after it)
LEASE_MARGIN_S = 30.0
#: how soon, then at most how often, a retry waiting for a call in flight looks for its decision
WAIT_POLL_S = 0.05
WAIT_POLL_MAX_S = 0.5


class Conflict(Exception):
    """The id is taken by another request body, or another query: 409."""


class Unavailable(Exception):
    """The decision could not be stored (Postgres out of reach, or the door stopping): 503."""


class StillInFlight(Exception):
    """The call for this id, made by an earlier request, has not ended within the timeout."""


@dataclass(frozen=True)
class Answer:
    """A query's decision and whether this request called for it (else it was stored)."""

    decision: PublicDecision
    called: bool


@dataclass(frozen=True)
class Feedback:
    """What a feedback did: ``applied``, ``pending`` (no decision yet: it waits for it) or
    ``duplicate`` (the decision had its feedback: the first one counts)."""

    query_id: str
    status: Literal["applied", "pending", "duplicate"]

    def json(self) -> dict[str, str]:
        """The body of ``POST /v1/feedback``'s answer."""
        return {"query_id": self.query_id, "status": self.status}


class Front:
    def __init__(
        self,
        decider: Decider,
        learner: Learner,
        instance: str,
        timeout_s: float,
        lease_margin_s: float = LEASE_MARGIN_S,
    ):
        self.decider = decider
        self.learner = learner
        self.instance = instance
        self.timeout_s = timeout_s
        self.lease_s = timeout_s + lease_margin_s
        self.engine = decider.learning_log.engine
        self.group = GroupStore(decider, retry_for_s=timeout_s)
        self._held: dict[str, str] = {}  # query id → token of the reservations calling here
        self._held_lock = threading.Lock()
        self._closed = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="metallm-door-lease", daemon=True)
        self._renewer.start()

    @property
    def tasks(self) -> list[str]:
        """The configured tasks, in the config's order (the first is ``metallm``'s)."""
        return list(self.decider.config.tasks)

    def query(self, req: ChatRequest, query_id: str | None) -> QueryEvent:
        """The query event of a request (its id: ``query_id``, else a new uuid), validated as
        the Kafka path validates one; :class:`InvalidEvent` with the reason."""
        fields = {
            "query_id": query_id or req.query_id or str(uuid.uuid4()),
            "task": req.task,
            "text": req.text,
            "metadata": req.metadata,
        }
        return self.decider.check(QueryEvent.from_fields(fields))

    def answer(
        self,
        event: QueryEvent,
        req: ChatRequest,
        relay: Relay | None = None,
        retryable: bool = True,
    ) -> Answer:
        """The decision of this query: stored before, waited for, or called for now (its
        answer streamed to ``relay`` as the arm writes it, when the arm can stream it). An id
        the door made itself (not ``retryable``: no client knows it before the answer) is
        called for without a reservation."""
        qid, token = event.query_id, str(uuid.uuid4())
        if not retryable:
            return self._call(event, req, None, relay)
        deadline = time.monotonic() + self.timeout_s
        with self.engine.begin() as conn:  # its own transaction: not the log's lock
            held = reserve(conn, qid, req.body_sha256, self.instance, self.lease_s, token)
            if not held.same_body:
                raise Conflict(f"query id {qid!r} was used with another request body")
            stored = self._stored(conn, event)  # Conflict: the reservation is undone
        if stored is not None:
            return Answer(stored, False)
        if held.owned:
            return self._call(event, req, token, relay)
        return self._wait(event, req, deadline, relay)

    def _wait(
        self, event: QueryEvent, req: ChatRequest, deadline: float, relay: Relay | None
    ) -> Answer:
        """Wait for another request's call for this id (here or elsewhere): look for its
        decision (a read, with backoff), and take the reservation over if its lease ends."""
        qid, pause = event.query_id, WAIT_POLL_S
        while time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, WAIT_POLL_MAX_S)
            with self.engine.connect() as conn:
                stored = self._stored(conn, event)
                lapsed = stored is None and lease_ended(conn, qid)
            if stored is not None:
                return Answer(stored, False)
            if lapsed:  # its instance died: take it over (the upsert checks again)
                return self.answer(event, req, relay)
        raise StillInFlight(f"query id {qid!r} is still being answered by another request")

    def _stored(self, conn: Connection, event: QueryEvent) -> PublicDecision | None:
        """The stored decision of this query, or None; :class:`Conflict` if the id is another
        query's (decided through Kafka, say)."""
        known = stored_queries(conn, [event.query_id]).get(event.query_id)
        if known is None:
            return None
        reason = difference(known, query_of(event, self.decider.config), event.query_id)
        if reason is not None:
            raise Conflict(reason)
        return public_decision(conn, event.query_id)

    def _call(
        self, event: QueryEvent, req: ChatRequest, token: str | None, relay: Relay | None
    ) -> Answer:
        if token is not None:
            with self._held_lock:
                self._held[event.query_id] = token  # its lease renewed while the call runs
        try:
            decision, failed = self.decider.call_one(event, req.max_tokens, req.temperature, relay)
            stored = self.group.store(decision, failed)
        except BaseException as exc:  # not stored: a retry need not wait for the lease
            if token is not None:
                release(self.engine, event.query_id, token)
            if isinstance(exc, StoreUnavailable | StoreClosed):
                raise Unavailable(str(exc)) from exc
            raise
        finally:
            with self._held_lock:
                self._held.pop(event.query_id, None)
        if not stored:  # another instance (or the Kafka path) stored this query first
            with self.engine.connect() as conn:
                found = self._stored(conn, event)  # Conflict if it was another query
            assert found is not None
            return Answer(found, False)
        return Answer(PublicDecision.of(decision), True)

    def decision(self, query_id: str) -> PublicDecision | None:
        with self.engine.connect() as conn:
            return public_decision(conn, query_id)

    def feedback(self, body: object) -> Feedback:
        """Apply a label through the label path (first wins, early ones wait, duplicates
        counted); :class:`InvalidEvent` with the reason for a body that is no label event."""
        event = LabelEvent.from_bytes(json.dumps(body).encode("utf-8"))  # as a label event
        stats = self.learner.learn([event])
        if stats.rejected:
            raise InvalidEvent(stats.rejected[0][1].reason)
        if stats.applied:
            return Feedback(event.query_id, "applied")
        if stats.pending:
            return Feedback(event.query_id, "pending")
        return Feedback(event.query_id, "duplicate")

    def _renew(self) -> None:
        """Renew the leases of the calls running here, a third of a lease apart."""
        while not self._closed.wait(self.lease_s / 3):
            with self._held_lock:
                held = dict(self._held)
            try:
                renew(self.engine, held, self.lease_s)
            except Exception as exc:  # the next round tries again, well within the lease
                log.warning("renewing the leases of %d HTTP calls failed: %s", len(held), exc)

    def close(self) -> None:
        """Store the decisions waiting to be stored, then refuse to store more; give up the
        reservations of calls still running (the door stopped waiting for them)."""
        self._closed.set()
        self.group.close()
        self._renewer.join(5)
        with self._held_lock:
            held = dict(self._held)
        for qid, token in held.items():
            release(self.engine, qid, token)
        if held:
            log.warning(
                "stopped with %d HTTP calls still running, not stored (their ids released for "
                "a retry): %s",
                len(held),
                ", ".join(sorted(held)),
            )
