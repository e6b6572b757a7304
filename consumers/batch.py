"""The consumers' loop: poll → validate → handle → publish → commit (the query consumer's is
:mod:`consumers.group_commit`, built on this one).

Offsets are committed only after the batch's database transaction has committed and every
message it produced (decisions, dead letters) is acknowledged by the broker, and only up to
the last event handled. When a rebalance is about to take partitions away (the group's
:class:`Rebalance` listener, inside a poll), the batches held — the one in hand and those
polled ahead, whose calls have started — are handled and committed first, so the next owner
starts after them and never calls for a query this consumer has stored.

When handling fails because Postgres or the broker cannot be reached, the consumer seeks back
to the start of the batch and retries with exponential backoff, so nothing is skipped. Any
other failure is about the events themselves: the batch is retried one event at a time and an
event that still fails on its own goes to the dead-letter topic with the reason
(``processing failed: …``), so one poison event never stalls its partition.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from consumers.failures import Backoff, describe, is_transient
from consumers.rebalance import Rebalance, group_rebalancing, heartbeat_sender, io_loop
from service import metrics
from service.events import InvalidEvent, dlq_record
from service.settings import MAX_POLL_RECORDS

log = logging.getLogger(__name__)
#: How long leaving a group (and closing the consumer) waits for the broker on stop.
LEAVE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes


@dataclass
class ConsumerStats:
    batches: int = 0
    events: int = 0
    invalid: int = 0  # events sent to the DLQ (invalid, or failing on their own)
    failures: int = 0  # batches (or polls) that failed and were retried


def partition_of(record: ConsumerRecord) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)


def flat(batches: list[list[ConsumerRecord]]) -> list[ConsumerRecord]:
    """The records of consecutive batches, in order."""
    return [r for batch in batches for r in batch]


class BatchConsumer:
    """Subclasses give ``validate(raw) -> event`` and ``handle(items) -> list[Outgoing]``."""

    name = "consumer"

    def __init__(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        dlq_topic: str,
        poll_timeout_ms: int = 500,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.dlq_topic = dlq_topic
        self.poll_timeout_ms = poll_timeout_ms
        self.max_backoff_s = max_backoff_s
        metrics.BATCH_FAILURES.labels(self.name)  # exported as 0 before the first retry
        self.backoff = Backoff(0.5, max_backoff_s)
        self.stats = ConsumerStats()
        self.stop_event = threading.Event()
        # events validated when polled, by (topic, partition, offset), until processed
        self._validated: dict[tuple[str, int, int], Any] = {}
        # the batches held while look_ahead polls: the one in hand first (see revoking)
        self._held: list[list[ConsumerRecord]] = []
        self.rebalancing = False  # between a rebalance's revocation and its assignment
        subscribed = getattr(consumer, "subscription", lambda: None)()
        if subscribed:  # the same topics, with the listener that finishes revoked work
            io_loop(consumer)  # checked now, not at the first rebalance (or stop)
            heartbeat_sender(consumer)
            consumer.subscribe(topics=sorted(subscribed), listener=Rebalance(self))

    # -- to override -------------------------------------------------------------------------
    def validate(self, raw: bytes | None) -> Any:
        raise NotImplementedError

    def handle(self, items: list[tuple[Any, ConsumerRecord]]) -> list[Outgoing]:
        raise NotImplementedError

    def periodic(self) -> None:
        """Called after each poll (and each batch), for work done every so often: it keeps
        its own clock."""

    # -- the loop ---------------------------------------------------------------------------
    lookahead = 0
    """How many batches to poll ahead of the one being handled, giving each one's events to
    :meth:`prepare` as it comes, so that work not depending on the batches before (embedding
    the next ones, calling their LLMs) overlaps their handling. Batches are still handled one
    after another in poll order; offsets are committed as without it. On stop, the batches
    polled ahead are handled too (their work was started), in order, up to the first that
    fails."""

    def abandon(self, records: list[ConsumerRecord]) -> None:
        """Called with events whose partitions a rebalance took before they could be handled
        (their prepared work is dropped; the next owner handles them)."""

    def revoking(self, revoked: set[TopicPartition]) -> None:
        """Before the group takes ``revoked`` away: handle and commit the batches held, in
        order, so their offsets move past them while they are still ours. From a batch that
        fails (Postgres down…), what is held is rewound and abandoned to the next owner."""
        held, self._held = [b for b in self._held if b], []
        if not held or not revoked:
            self._held = held
            return
        log.info(
            "%s: rebalance takes %d partitions; finishing the %d events held first",
            self.name,
            len(revoked),
            len(flat(held)),
        )
        for i, records in enumerate(held):
            try:
                self.process(records)
            except Exception:
                self._failed(
                    "a batch held at a rebalance failed; left to the next owner", len(records)
                )
                self.rewind(flat(held[i:]))
                self.abandon(flat(held[i:]))
                return

    def lost(self, partitions: set[TopicPartition]) -> None:
        """The group expelled this consumer (a missed session): its offsets can no longer be
        committed, so what is held is abandoned to the partitions' next owners."""
        held, self._held = flat(self._held), []
        if held:
            log.warning("%s: expelled from the group; %d events held left", self.name, len(held))
            self.abandon(held)

    def prepare(self, events: list[Any]) -> None:
        """Called with the valid events of each batch as soon as it is polled (with
        ``lookahead``: while the batches before it are being handled). Must store nothing and
        commit nothing: the batch may yet be dropped, rewound or handled one event at a time."""

    def _polled(self, records: list[ConsumerRecord]) -> None:
        """Validate a batch just polled (once: :meth:`process` takes the events from here)
        and give its valid events to :meth:`prepare`. Invalid ones are dead-lettered when the
        batch is processed."""
        events = []
        for record in records:
            try:
                event = self.validate(record.value)
            except Exception:  # noqa: S112 - validated again, and dead-lettered, in process
                continue
            self._validated[(record.topic, record.partition, record.offset)] = event
            events.append(event)
        # bounded: every batch held, and one more of events a rebalance or rewind dropped
        while len(self._validated) > MAX_POLL_RECORDS * (self.lookahead + 2):  # oldest first
            self._validated.pop(next(iter(self._validated)))
        if events:
            self.prepare(events)

    def _event(self, record: ConsumerRecord) -> Any:
        """The valid event of a record: validated when it was polled, or now."""
        event = self._validated.pop((record.topic, record.partition, record.offset), None)
        return event if event is not None else self.validate(record.value)

    def run(self) -> None:
        ahead: list[list[ConsumerRecord]] = []  # batches polled and prepared, not handled yet
        while not self.stop_event.is_set():
            if ahead:
                records = ahead.pop(0)
            else:
                try:
                    records = self.poll(self.poll_timeout_ms)
                except Exception:
                    self._back_off("poll failed", 0)
                    continue
                self._polled(records)
            if records and self.lookahead:
                records, ahead = self.look_ahead(records, ahead)
            if records:
                try:
                    self.process(records)
                    self.backoff.reset()
                except Exception as exc:
                    if is_transient(exc):
                        self.rewind(records + flat(ahead))  # polled again after it
                        ahead = []
                        self._back_off("batch failed", len(records))
                        continue
                    self._failed("batch failed; retrying its events one at a time", len(records))
                    try:
                        self.isolate(records, flat(ahead))
                        self.backoff.reset()
                        if self.stop_event.is_set():  # isolate may have stopped part-way
                            ahead = []
                    except Exception:
                        ahead = []  # isolate rewound them with the events not handled
                        self._back_off("retrying one at a time failed", len(records))
                        continue
            self.housekeeping()
        if ahead:
            self.finish(ahead)

    def finish(self, batches: list[list[ConsumerRecord]]) -> None:
        """On stop, handle the batches polled ahead (their work has started), in order; from
        the first that fails, they are left uncommitted for the next start."""
        for i, records in enumerate(batches):
            try:
                self.process(records)
            except Exception:
                self._failed(
                    "a batch polled ahead failed on stop; left for the next start", len(records)
                )
                self.rewind(flat(batches[i:]))
                return

    def poll(self, timeout_ms: int) -> list[ConsumerRecord]:
        batch = self.consumer.poll(timeout_ms=timeout_ms)
        return [r for part in batch.values() for r in part]

    def look_ahead(
        self, records: list[ConsumerRecord], ahead: list[list[ConsumerRecord]]
    ) -> tuple[list[ConsumerRecord], list[list[ConsumerRecord]]]:
        """Poll (without waiting) until ``lookahead`` batches after ``records`` are held, and
        prepare each new one. A rebalance in those polls may take partitions away, or give
        them back from their committed offsets: every batch keeps only what is still ours, and
        new batches only what comes after the events held."""
        if len(ahead) >= self.lookahead:  # no poll, so no rebalance either
            return records, ahead
        polled: list[list[ConsumerRecord]] = []
        self._held = [records, *ahead]  # a rebalance in these polls handles them (revoking)
        while len(self._held) - 1 + len(polled) < self.lookahead:
            try:
                batch = self.poll(0)
            except Exception:  # the regular poll after this batch tries again
                log.debug("%s: polling ahead failed", self.name, exc_info=True)
                break
            if not batch:
                break
            polled.append(batch)
        records, *ahead = self._held or [[]]
        self._held = []
        owned = self.consumer.assignment()
        held = [[r for r in batch if partition_of(r) in owned] for batch in (records, *ahead)]
        dropped = [r for r in (*records, *flat(ahead)) if partition_of(r) not in owned]
        if dropped:
            log.info("%s: %d events of a revoked partition dropped", self.name, len(dropped))
            self.abandon(dropped)
        last: dict[TopicPartition, int] = {}
        for r in flat(held):
            tp = partition_of(r)
            last[tp] = max(last.get(tp, -1), r.offset)
        fresh = []
        behind: set[TopicPartition] = set()  # given back by a rebalance behind events held
        for polled_batch in polled:  # (a later poll may have revoked an earlier's partitions)
            batch = []
            for r in polled_batch:
                tp = partition_of(r)
                if tp not in owned:
                    continue
                if r.offset <= last.get(tp, -1):
                    behind.add(tp)
                    continue
                batch.append(r)
                last[tp] = r.offset
            if batch:
                self._polled(batch)
                fresh.append(batch)
        for tp in behind:  # the next polls start after the events held, not among them again
            if self.consumer.position(tp) <= last[tp]:
                self.consumer.seek(tp, last[tp] + 1)
        mine, *kept = held
        return mine, [batch for batch in kept if batch] + fresh

    def _back_off(self, what: str, n: int) -> None:
        """Log the failure being handled and wait before the next try (less on a stop)."""
        delay = self.backoff.next()
        self._failed(what, n, delay)
        self.stop_event.wait(delay)

    def _failed(self, what: str, n: int, backoff: float | None = None) -> None:
        self.stats.failures += 1
        metrics.BATCH_FAILURES.labels(self.name).inc()
        log.exception(
            "%s: %s (%d events)%s",
            self.name,
            what,
            n,
            "" if backoff is None else f"; retrying in {backoff:.1f} s",
        )

    def process(self, records: list[ConsumerRecord]) -> None:
        valid: list[tuple[Any, ConsumerRecord]] = []
        outgoing: list[Outgoing] = []
        for record in records:
            try:
                valid.append((self._event(record), record))
            except Exception as exc:  # validation is pure: whatever it raises, the event is bad
                reason = str(exc) if isinstance(exc, InvalidEvent) else f"invalid: {describe(exc)}"
                outgoing.append(self.dead_letter(record, reason))
        if valid:
            outgoing.extend(self.handle(valid))
        self.publish(outgoing, records)
        self.stats.batches += 1
        self.stats.events += len(records)

    def isolate(
        self, records: list[ConsumerRecord], ahead: list[ConsumerRecord] | None = None
    ) -> None:
        """Handle each event of a failed batch on its own; an event that fails on its own (for
        any reason but an unreachable Postgres or broker) goes to the DLQ with the reason. On a
        connection failure (or a stop), seek back to the event it happened at, and the batch
        polled ahead (``ahead``) back to its start, and raise (return). Each partition goes
        back to the earliest event not handled: a partition whose events in this batch were
        all handled goes back to its first event polled ahead."""
        ahead = ahead or []
        for i, record in enumerate(records):
            if self.stop_event.is_set():
                self.rewind(records[i:] + ahead)
                return
            try:
                try:
                    self.process([record])
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    log.exception("%s: %s[%d]@%d fails on its own", self.name, *self._where(record))
                    reason = f"processing failed: {describe(exc)}"
                    self.publish([self.dead_letter(record, reason)], [record])
            except Exception:
                self.rewind(records[i:] + ahead)
                raise

    def dead_letter(self, record: ConsumerRecord, reason: str) -> Outgoing:
        self.stats.invalid += 1
        metrics.DLQ.labels(record.topic).inc()
        log.warning("%s: %s[%d]@%d to the DLQ: %s", self.name, *self._where(record), reason)
        return Outgoing(
            self.dlq_topic,
            record.key,
            dlq_record(
                record.key, record.value, reason, record.topic, record.partition, record.offset
            ),
        )

    @staticmethod
    def _where(record: ConsumerRecord) -> tuple[str, int, int]:
        return record.topic, record.partition, record.offset

    def publish(self, outgoing: list[Outgoing], records: list[ConsumerRecord]) -> None:
        """Send ``outgoing``, wait for the broker to take every message, then :meth:`commit`
        ``records``."""
        futures = [self.producer.send(o.topic, key=o.key, value=o.value) for o in outgoing]
        if futures:
            self.producer.flush()
        for future in futures:
            future.get(timeout=30)  # raises if the broker did not take it
        self.commit(records)

    def commit(self, records: list[ConsumerRecord]) -> None:
        """Commit the offsets just past ``records``, stored and published (and no further)."""
        after: dict[TopicPartition, OffsetAndMetadata] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            if tp not in after or after[tp].offset <= r.offset:
                after[tp] = OffsetAndMetadata(r.offset + 1, "", -1)
        self.consumer.commit(after)

    def housekeeping(self) -> None:
        try:
            self.record_lag()
        except Exception:
            log.debug("%s: could not read the consumer lag", self.name, exc_info=True)
        try:
            self.periodic()
        except Exception:
            log.exception("%s: periodic work failed; will retry", self.name)

    def record_lag(self) -> None:
        """Export how far each assigned partition is behind its high-water mark."""
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None:
                continue
            position = self.consumer.position(tp, timeout_ms=1000)
            if position is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(highwater - position)

    def rewind(self, records: list[ConsumerRecord]) -> None:
        """Seek each partition back to the first record of the failed batch."""
        first: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        for tp, offset in first.items():
            try:
                self.consumer.seek(tp, offset)
            except Exception:  # revoked meanwhile: its next owner starts at the committed offset
                log.warning("%s: cannot seek %s back to %d (not assigned)", self.name, tp, offset)

    def stop(self) -> None:
        self.stop_event.set()

    def finish_rebalance(self, timeout_s: float) -> None:
        """On stop, after the loop, before leaving the group: complete a rebalance this
        consumer is in the middle of (its partitions revoked, none assigned yet), or one its
        group has begun that it has not heard of yet (a member joined since its last
        heartbeat: :func:`group_rebalancing` asks now). Tansu stalls a group whose member
        leaves during a rebalance: the others' join waits for the rebalance timeout (ten
        minutes). At most ``timeout_s``; what these polls return is dropped, uncommitted: the
        partitions' next owner reads it."""
        deadline = time.monotonic() + timeout_s
        if not self.rebalancing and group_rebalancing(self.consumer, min(timeout_s, 2.0)):
            log.info("%s: the group is rebalancing; joining it before leaving", self.name)
            self.rebalancing = True  # the next poll joins; the assignment ends it
        while self.rebalancing and time.monotonic() < deadline:
            try:
                self.consumer.poll(timeout_ms=200)
            except Exception:  # the broker is away: leave as things are
                log.debug("%s: polling to finish a rebalance failed", self.name, exc_info=True)
                return

    def leave(self, rebalance_s: float, close_s: float = LEAVE_TIMEOUT_S) -> None:
        """On stop, after the loop: finish a rebalance (:meth:`finish_rebalance`, at most
        ``rebalance_s``), then leave the group and close, waiting at most ``close_s`` for the
        broker's answer (kafka-python waits up to ``request_timeout_ms``, 30 s, for a broker
        that does not answer: paused, or still holding this consumer's join)."""
        self.finish_rebalance(rebalance_s)
        self.consumer.close(timeout_ms=round(close_s * 1000))


def run_in_thread(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread
