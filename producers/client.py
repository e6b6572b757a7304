"""Ask metallm over Kafka and get the answer back: publish a query, wait for its decision.

One :class:`Client` serves any number of outstanding asks from one process: one consumer,
assigned every partition of the decisions topic and of the dead-letter topic, reads them on a
thread of its own and hands each decision to the ask waiting for its query id (a dict of
waiters). It takes its place at the end of both topics when it starts, before it publishes
anything, so no decision of its queries can go past unseen.

    with Client("127.0.0.1:9092") as client:             # doctest: +SKIP
        answer = client.ask("The film was a delight.", task="sentiment")
        print(answer.prediction, answer.arm, answer.cost_usd)

An ask ends in one of three ways: an :class:`Answer` (whatever the arm did: ``status`` and
``error`` say when it failed), :class:`QueryRejected` (the service sent the query to the
dead-letter topic; the exception carries the reason), or :class:`AnswerTimeout` (no decision
within the timeout: the service is not running on these topics, or is far behind).
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from consumers.kafka_io import client_options, create_topics
from service.events import QueryEvent
from service.settings import Settings

log = logging.getLogger(__name__)

#: How long an ask waits for its decision unless told otherwise (seconds)
DEFAULT_TIMEOUT_S = 60.0
_DEFAULTS = Settings.model_fields


def new_query_id() -> str:
    """A fresh random query id (``q-`` and 32 hex digits)."""
    return f"q-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Answer:
    """A query's decision, as the decisions topic told it.

    ``answer`` is what the model returned (capped as stored), ``prediction`` that answer parsed
    into the label set (None unless ``status`` is ``ok``), ``error`` why the call failed.

    >>> a = Answer.from_event({"query_id": "q-1", "task": "sentiment", "arm": "small",
    ...     "status": "ok", "prediction": "positive", "answer": "Positive.", "cost_usd": 1e-6,
    ...     "latency_ms": 310.0, "propensity": 0.9, "decided_at": "2026-12-07T10:00:00+00:00"})
    >>> a.ok, a.prediction, a.answer, a.error
    (True, 'positive', 'Positive.', None)
    """

    query_id: str
    task: str
    arm: str
    status: str
    prediction: str | None
    answer: str | None
    error: str | None
    cost_usd: float
    latency_ms: float | None
    propensity: float
    decided_at: datetime | None
    fallback_arm: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the arm answered within the label set (``status == "ok"``)."""
        return self.status == "ok"

    @classmethod
    def from_event(cls, body: Mapping[str, Any]) -> Answer:
        """From a decision event's JSON (fields it does not know are ignored, so a client
        keeps working when the event gains some)."""
        decided_at = body.get("decided_at")
        return cls(
            query_id=body["query_id"],
            task=body.get("task", ""),
            arm=body.get("arm", ""),
            status=body.get("status", ""),
            prediction=body.get("prediction"),
            answer=body.get("answer"),
            error=body.get("error"),
            cost_usd=float(body.get("cost_usd") or 0.0),
            latency_ms=body.get("latency_ms"),
            propensity=float(body.get("propensity") or 0.0),
            decided_at=datetime.fromisoformat(decided_at) if decided_at else None,
            fallback_arm=body.get("fallback_arm"),
        )


class AnswerTimeout(TimeoutError):
    """No decision for the query within the timeout."""

    def __init__(self, query_id: str, timeout_s: float) -> None:
        super().__init__(
            f"no decision for query {query_id!r} within {timeout_s:g} s "
            "(is `metallm serve` running on these topics?)"
        )
        self.query_id = query_id
        self.timeout_s = timeout_s


class QueryRejected(ValueError):
    """The service sent the query to the dead-letter topic; ``reason`` says why."""

    def __init__(self, query_id: str, reason: str) -> None:
        super().__init__(f"query {query_id!r} was rejected: {reason}")
        self.query_id = query_id
        self.reason = reason


class ClientClosed(RuntimeError):
    """The client was closed while the ask waited."""


@dataclass(frozen=True)
class Topics:
    """The topics a client uses (the service's defaults unless told)."""

    queries: str = _DEFAULTS["queries_topic"].default
    decisions: str = _DEFAULTS["decisions_topic"].default
    dlq: str = _DEFAULTS["dlq_topic"].default
    #: partitions of a topic the client creates because it does not exist yet
    partitions: int = _DEFAULTS["topic_partitions"].default


class Client:
    """Publishes queries and waits for their decisions (or dead letters) on one consumer.

    ``bootstrap`` is ``"host:port[,host:port…]"`` (plaintext), or the service's
    :class:`~service.settings.Settings`: its broker, SASL/SSL options and topics. The topics
    that do not exist yet are created (a client started before the service). Thread-safe: any
    thread may ask.
    """

    def __init__(
        self, bootstrap: str | Settings = "127.0.0.1:9092", topics: Topics | None = None
    ) -> None:
        if isinstance(bootstrap, Settings):
            s = bootstrap
            options = client_options(s)
            default = Topics(s.queries_topic, s.decisions_topic, s.dlq_topic, s.topic_partitions)
        else:
            options, default = {"bootstrap_servers": bootstrap.split(",")}, Topics()
        self.topics = topics or default
        create_topics(
            bootstrap,
            [self.topics.queries, self.topics.decisions, self.topics.dlq],
            self.topics.partitions,
        )
        self._consumer = KafkaConsumer(
            group_id=None, enable_auto_commit=False, fetch_max_wait_ms=100, **options
        )
        try:
            self._take_place_at_the_end()
            self._producer = KafkaProducer(acks="all", linger_ms=2, **options)
        except BaseException:
            self._consumer.close()
            raise
        self._lock = threading.Lock()
        self._waiting: dict[str, list[Future[Answer]]] = {}
        #: (deadline, order, query id, timeout, future): the asks by deadline
        self._deadlines: list[tuple[float, int, str, float, Future[Answer]]] = []
        self._order = itertools.count()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="metallm-client", daemon=True)
        self._thread.start()

    # -- asking ---------------------------------------------------------------------------
    def ask(
        self,
        text: str,
        task: str,
        query_id: str | None = None,
        options: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> Answer:
        """Publish a query and wait for its decision: the :class:`Answer`, or
        :class:`QueryRejected`, or :class:`AnswerTimeout` after ``timeout`` seconds."""
        query_id = query_id or new_query_id()
        future = self.submit(text, task, query_id, options, metadata, timeout)
        # the listener times the ask out; the margin only guards against a dead listener
        done, _ = wait([future], timeout=timeout + 5)
        if not done:
            raise AnswerTimeout(query_id, timeout)
        return future.result()

    def submit(
        self,
        text: str,
        task: str,
        query_id: str | None = None,
        options: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> Future[Answer]:
        """Publish a query and return at once a future of its :class:`Answer` (it fails with
        :class:`QueryRejected` or :class:`AnswerTimeout`): many asks in flight from one
        thread. The query is checked here first (a bad one raises ``ValueError``)."""
        event = QueryEvent(
            query_id=query_id or new_query_id(),
            text=text,
            task=task,
            options=list(options) if options is not None else None,
            metadata=dict(metadata) if metadata is not None else None,
        )
        qid = event.query_id
        future: Future[Answer] = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._closed.is_set():
                raise ClientClosed("the client is closed")
            self._waiting.setdefault(qid, []).append(future)
            deadline = time.monotonic() + timeout
            heapq.heappush(self._deadlines, (deadline, next(self._order), qid, timeout, future))
        try:
            sent = self._producer.send(
                self.topics.queries, key=qid.encode(), value=event.to_bytes()
            )
        except Exception as exc:
            self._settle(qid, future, exc)
            raise
        sent.add_errback(lambda exc: self._settle(qid, future, exc))
        return future

    # -- the listener ---------------------------------------------------------------------
    def _take_place_at_the_end(self) -> None:
        """Assign every partition of the decisions and dead-letter topics and fix the position
        at their current end (``position`` resolves the lazy seek now): whatever is published
        after this returns, the listener reads."""
        parts = []
        for topic in (self.topics.decisions, self.topics.dlq):
            ids = self._consumer.partitions_for_topic(topic)
            if not ids:
                raise RuntimeError(f"topic {topic} has no partitions the client can see")
            parts += [TopicPartition(topic, p) for p in sorted(ids)]
        self._consumer.assign(parts)
        self._consumer.seek_to_end(*parts)
        for tp in parts:
            self._consumer.position(tp)

    def _listen(self) -> None:
        while not self._closed.is_set():
            try:
                batches = self._consumer.poll(timeout_ms=100)
            except Exception:  # the broker away: kafka-python reconnects; try again
                log.warning("metallm client: polling failed", exc_info=True)
                time.sleep(0.5)
                batches = {}
            for tp, records in batches.items():
                for record in records:
                    self._read(tp.topic, record.value)
            self._expire()

    def _read(self, topic: str, value: bytes | None) -> None:
        try:
            body = json.loads(value or b"null")
            if topic == self.topics.decisions:
                self._settle(body["query_id"], None, Answer.from_event(body))
            elif body.get("topic") == self.topics.queries and body.get("key_b64"):
                qid = base64.b64decode(body["key_b64"]).decode("utf-8", "replace")
                self._settle(qid, None, QueryRejected(qid, body.get("reason", "(no reason)")))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.debug("metallm client: skipped an unreadable event on %s", topic)

    def _settle(self, qid: str, only: Future[Answer] | None, outcome: Any) -> None:
        """Give ``outcome`` (an Answer or an exception) to the asks waiting for ``qid`` (or to
        ``only`` of them)."""
        with self._lock:
            waiting = self._waiting.get(qid)
            if not waiting:
                return
            if only is None:
                done, self._waiting[qid] = waiting, []
            else:
                done = [f for f in waiting if f is only]
                self._waiting[qid] = [f for f in waiting if f is not only]
            if not self._waiting[qid]:
                del self._waiting[qid]
        for future in done:
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _expire(self) -> None:
        now = time.monotonic()
        expired = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, qid, timeout, future = heapq.heappop(self._deadlines)
                if not future.done():
                    expired.append((qid, future, AnswerTimeout(qid, timeout)))
        for qid, future, timed_out in expired:
            self._settle(qid, future, timed_out)

    # -- closing --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop listening; asks still waiting fail with :class:`ClientClosed`."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            waiting, self._waiting = self._waiting, {}
        self._thread.join(timeout=5)
        for futures in waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(ClientClosed("the client was closed"))
        self._producer.close(timeout=5)
        self._consumer.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
