"""What the door does for a request, over the service's core: answer a query once per id (on
any instance), apply feedback, read a decision. Blocking; the server runs it on its threads.

A query id is reserved in Postgres before its arm is called (:mod:`service.log.requests`): a
retry with the same id and body waits for the call in flight or returns the stored decision; a
body of its own under that id is refused (:class:`Conflict`). A reservation is a lease of the
request timeout and :data:`LEASE_MARGIN_S`: if its instance dies, a retry takes it over then.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.engine import Connection

from door.shapes import ChatRequest
from door.store import GroupStore
from service import metrics
from service.events import InvalidEvent, LabelEvent, QueryEvent, describe_validation_error
from service.llm.streaming import Relay
from service.log.decisions import stored_queries
from service.log.requests import PUBLIC_COLUMNS, public_decision, release, reserve
from service.pipeline import Decider, Learner
from service.query_checks import difference, query_of

log = logging.getLogger(__name__)

#: how much longer than the request timeout a reservation lasts (a call may end just after it)
LEASE_MARGIN_S = 30.0
#: how often a retry waiting for a call in flight (here or elsewhere) looks for its decision
WAIT_POLL_S = 0.05


class Conflict(Exception):
    """The id is taken by another request body, or another query: 409."""


class StillInFlight(Exception):
    """The call for this id, made by an earlier request, has not ended within the timeout."""


@dataclass(frozen=True)
class Answer:
    """A query's stored decision (public columns) and whether this request called for it."""

    row: dict[str, Any]
    called: bool


class Front:
    def __init__(self, decider: Decider, learner: Learner, instance: str, timeout_s: float):
        self.decider = decider
        self.learner = learner
        self.instance = instance
        self.timeout_s = timeout_s
        self.engine = decider.learning_log.engine
        self.group = GroupStore(decider)

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
        try:
            event = QueryEvent.model_validate(fields)
        except ValidationError as exc:
            raise InvalidEvent(describe_validation_error(exc)) from None
        return self.decider.validate(event.to_bytes())

    def answer(self, event: QueryEvent, req: ChatRequest, relay: Relay | None = None) -> Answer:
        """The decision of this query: stored before, waited for, or called for now (its
        answer streamed to ``relay`` as the arm writes it, when the arm can stream it)."""
        qid = event.query_id
        deadline = time.monotonic() + self.timeout_s
        lease = self.timeout_s + LEASE_MARGIN_S
        while True:
            with self.engine.begin() as conn:  # its own transaction: not the log's lock
                held = reserve(conn, qid, req.body_sha256, self.instance, lease)
                if not held.same_body:
                    raise Conflict(f"query id {qid!r} was used with another request body")
                row = self._stored(conn, event)  # Conflict: the reservation is undone
            if row is not None:
                return Answer(row, False)
            if held.owned:
                return self._call(event, req, relay)
            if time.monotonic() > deadline:
                raise StillInFlight(f"query id {qid!r} is still being answered by another request")
            time.sleep(WAIT_POLL_S)

    def _stored(self, conn: Connection, event: QueryEvent) -> dict[str, Any] | None:
        """The stored decision of this query, or None; :class:`Conflict` if the id is another
        query's (decided through Kafka, say)."""
        known = stored_queries(conn, [event.query_id]).get(event.query_id)
        if known is None:
            return None
        reason = difference(known, query_of(event, self.decider.config), event.query_id)
        if reason is not None:
            raise Conflict(reason)
        return public_decision(conn, event.query_id)

    def _call(self, event: QueryEvent, req: ChatRequest, relay: Relay | None) -> Answer:
        try:
            decision, failed = self.decider.call_one(event, req.max_tokens, req.temperature, relay)
            stored = self.group.store(decision, failed)
        except BaseException:  # not stored: a retry need not wait for the lease
            release(self.engine, event.query_id, self.instance)
            raise
        if not stored:  # another instance stored this query's decision first
            with self.engine.connect() as conn:
                row = public_decision(conn, event.query_id)
            assert row is not None
            return Answer(row, False)
        metrics.DECISIONS.labels(decision.arm, decision.status).inc()  # as the Kafka path
        metrics.COST.labels(decision.arm).inc(decision.cost_usd)
        if decision.latency_ms is not None:
            metrics.LLM_LATENCY.labels(decision.arm).observe(decision.latency_ms / 1000)
        return Answer({c: getattr(decision, c, None) for c in PUBLIC_COLUMNS}, True)

    def decision(self, query_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return public_decision(conn, query_id)

    def feedback(self, body: object) -> dict[str, Any]:
        """Apply a label through the label path (first wins, early ones wait, duplicates
        counted); :class:`InvalidEvent` with the reason for a body that is no label event."""
        event = LabelEvent.from_bytes(json.dumps(body).encode("utf-8"))  # as a label event
        stats = self.learner.learn([event])
        if stats.rejected:
            raise InvalidEvent(stats.rejected[0][1].reason)
        if stats.applied:
            status = "applied"
        elif stats.pending:
            status = "pending"  # no decision yet: it waits for it
        else:
            status = "duplicate"  # the decision had its label: the first one counts
        return {"query_id": event.query_id, "status": status}

    def close(self) -> None:
        """Store the decisions waiting to be stored."""
        self.group.close()
