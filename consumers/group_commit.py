"""Group commit: store and publish what is ready every ≤ ``commit_interval``, not whole batches.

The consumer keeps polling while the events it holds are worked on (at most ``polls_held``
polls' worth; :meth:`BatchConsumer.prepare` starts each one's work as it is polled). Every
``commit_interval`` at most, the events held whose work has ended (:meth:`ready`: an LLM call
answered or failed; an invalid event, or one needing no work, at once) are handled together —
one :meth:`BatchConsumer.handle`, one database transaction — and what they produce is published.
A slow event so holds back nobody's answer but its own.

**Offsets after the database** (the half of invariant 4 this module holds): once the messages
of a group are acknowledged, each partition's offset is committed up to its first event still
held — the contiguous prefix of its events stored and published — never past an event not
stored. Dead-lettered events and events found decided before count as done at their offsets.

A group failing because Postgres or the broker is out of reach rewinds every partition to its
first event not committed (the events held are polled again; their work, kept by the
subclass, is not redone), and retries after a backoff. A group failing otherwise is handled
one event at a time, an event failing alone going to the dead-letter topic. Before a rebalance
takes partitions away, and on stop, every event held is handled (waiting for its work) and
committed, so the next owner starts after them.

With ``commit_interval`` 0 the consumer is :class:`BatchConsumer` itself: each poll's batch is
handled whole, the next ones polled ahead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from consumers.batch import BatchConsumer, partition_of
from consumers.failures import is_transient
from service.settings import QUERY_BATCHES_HELD

log = logging.getLogger(__name__)

HOUSEKEEPING_EVERY_S = 1.0  # the lag gauges and periodic work, not on every short poll


def _where(record: ConsumerRecord) -> tuple[str, int, int]:
    return record.topic, record.partition, record.offset


class GroupCommitConsumer(BatchConsumer):
    """Subclasses give ``validate``, ``handle`` and ``ready(event) -> bool``."""

    polls_held = QUERY_BATCHES_HELD
    """The most polls' events held at once (a poll is taken only while there is room for a
    whole one)."""

    def __init__(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        dlq_topic: str,
        commit_interval_ms: int = 50,
        **kwargs: Any,
    ) -> None:
        super().__init__(consumer, producer, dlq_topic, **kwargs)
        self.commit_interval_s = commit_interval_ms / 1000
        self._hand: list[ConsumerRecord] = []  # polled, not committed: in poll order
        self._max_done: dict[TopicPartition, int] = {}  # the last offset stored, by partition
        self._committed: dict[TopicPartition, int] = {}  # the offset committed, by partition
        self._last_group = 0.0  # when the last group was taken (time.monotonic)
        self._next_housekeeping = 0.0
        self.groups = 0  # groups stored (each one transaction)

    # -- to override -------------------------------------------------------------------------
    def ready(self, event: Any) -> bool:
        """Whether handling ``event`` now would not wait for its work (an LLM call)."""
        return True

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        if not self.commit_interval_s:
            super().run()
            return
        while not self.stop_event.is_set():
            stored = False
            if self._hand and time.monotonic() >= self._last_group + self.commit_interval_s:
                stored = self._store_ready()
            wait_s = self._wait_s()
            if self._room() and not self.stop_event.is_set():
                self._take_poll(wait_s)
            else:
                self.stop_event.wait(wait_s)
            self._housekeeping(stored)
        self._drain()

    def _housekeeping(self, stored: bool) -> None:
        """The lag gauges and periodic work, once a second: right after a group (the next is
        an interval away) or with nothing held, so that it does not delay a group, unless it
        is a second late."""
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        if stored or not self._hand or now >= self._next_housekeeping + HOUSEKEEPING_EVERY_S:
            self._next_housekeeping = now + HOUSEKEEPING_EVERY_S
            self.housekeeping()

    def _wait_s(self) -> float:
        """How long the loop may wait (in a poll) before it looks at the events held again:
        until the next group is due, then a fifth of the interval at a time."""
        if not self._hand:
            return self.poll_timeout_ms / 1000
        due = self._last_group + self.commit_interval_s - time.monotonic()
        return due if due > 0 else self.commit_interval_s / 5

    def _room(self) -> bool:
        per_poll = int(self.consumer.config.get("max_poll_records") or 500)
        return len(self._hand) + per_poll <= self.polls_held * per_poll

    def _take_poll(self, wait_s: float) -> None:
        try:
            records = self.poll(max(1, round(wait_s * 1000)))
        except Exception:
            self._back_off("poll failed", 0)
            return
        owned = self.consumer.assignment()
        gone = [r for r in self._hand if partition_of(r) not in owned]
        if gone:  # a rebalance took them, unfinished (revoking stores what it can first)
            log.info("%s: %d events of a revoked partition dropped", self.name, len(gone))
            self._hand = [r for r in self._hand if partition_of(r) in owned]
            self.abandon(gone)
        last: dict[TopicPartition, int] = {}
        for r in self._hand:
            last[partition_of(r)] = r.offset
        fresh = [
            r
            for r in records
            if partition_of(r) in owned and r.offset > last.get(partition_of(r), -1)
        ]
        if fresh:
            self._polled(fresh)
            self._hand.extend(fresh)

    def _ready(self, record: ConsumerRecord) -> bool:
        key = _where(record)
        event = self._validated.get(key)
        if event is None:
            try:
                event = self.validate(record.value)
            except Exception:  # dead-lettered when stored: nothing to wait for
                return True
            self._validated[key] = event
        return self.ready(event)

    def _store_ready(self) -> bool:
        """Store, publish and commit the events held whose work has ended, as one group.
        Returns whether there were any."""
        group = [r for r in self._hand if self._ready(r)]
        if not group:
            return False
        self._last_group = time.monotonic()
        try:
            self.process(group)
            self.groups += 1
            self.backoff.reset()
        except Exception as exc:
            if is_transient(exc):
                self._give_back("group commit failed", len(group))
            else:
                self._failed("group commit failed; storing its events one at a time", len(group))
                self._isolate(group)
        return True

    def _isolate(self, group: list[ConsumerRecord]) -> None:
        try:
            self.isolate(group)  # on a stop part-way, the rest stay held: _drain has them
            self.backoff.reset()
        except Exception:
            self._give_back("storing one at a time failed", len(group))

    def _give_back(self, what: str, n: int) -> None:
        """After a transient failure: every partition back to its first event not committed
        (the events held are polled again), then wait."""
        self.rewind(self._hand)
        self._hand = []
        self._back_off(what, n)

    def _drain(self) -> None:
        """On stop: every event held, its work finished, is stored and committed; from a
        failure, the rest are left uncommitted for the next start."""
        if self._hand:
            self.finish([list(self._hand)])
            self._hand = []

    # -- offsets ----------------------------------------------------------------------------
    def commit(self, records: list[ConsumerRecord]) -> None:
        """``records`` are stored and published: commit each partition up to its first event
        still held, or past the last one stored when none is held."""
        if not self.commit_interval_s:
            super().commit(records)
            return
        done = {_where(r) for r in records}
        self._hand = [r for r in self._hand if _where(r) not in done]
        for r in records:
            tp = partition_of(r)
            self._max_done[tp] = max(self._max_done.get(tp, -1), r.offset)
        first_held: dict[TopicPartition, int] = {}
        for r in self._hand:
            first_held.setdefault(partition_of(r), r.offset)
        after: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp in {partition_of(r) for r in records}:
            upto = first_held.get(tp, self._max_done[tp] + 1)
            if upto > self._committed.get(tp, -1):
                after[tp] = OffsetAndMetadata(upto, "", -1)
        if after:
            self.consumer.commit(after)
            for tp, offset in after.items():
                self._committed[tp] = offset.offset

    # -- rebalances -------------------------------------------------------------------------
    def revoking(self, revoked: set[TopicPartition]) -> None:
        """Before the group takes ``revoked`` away: store and commit every event held (its
        work finished first), so the next owner starts after them. If that fails, they are
        rewound and abandoned to the next owner."""
        if not self.commit_interval_s:
            super().revoking(revoked)
            return
        held = list(self._hand)
        if held and revoked:
            log.info(
                "%s: rebalance takes %d partitions; finishing the %d events held first",
                self.name,
                len(revoked),
                len(held),
            )
            try:
                self.process(held)
            except Exception:
                self._failed("events held at a rebalance failed; left to the next owner", len(held))
                self.rewind(held)
                self.abandon(held)
                self._hand = []
        self._forget(revoked)

    def lost(self, partitions: set[TopicPartition]) -> None:
        if not self.commit_interval_s:
            super().lost(partitions)
            return
        held, self._hand = self._hand, []
        if held:
            log.warning("%s: expelled from the group; %d events held left", self.name, len(held))
            self.abandon(held)
        self._forget(partitions)

    def _forget(self, partitions: set[TopicPartition]) -> None:
        """Their offsets are another member's to commit now."""
        for tp in partitions:
            self._max_done.pop(tp, None)
            self._committed.pop(tp, None)
