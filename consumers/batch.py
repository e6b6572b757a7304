"""The loop both consumers share: poll → validate → handle → publish → commit.

Offsets are committed only after the batch's database transaction has committed and every
message it produced (decisions, dead letters) is acknowledged by the broker. When handling
fails (Postgres down, say), the consumer seeks back to the start of the batch and retries with
exponential backoff, so nothing is skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from service import metrics
from service.events import InvalidEvent, dlq_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes


@dataclass
class ConsumerStats:
    batches: int = 0
    events: int = 0
    invalid: int = 0
    failures: int = 0


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
        self.stats = ConsumerStats()
        self.stop_event = threading.Event()

    # -- to override -------------------------------------------------------------------------
    def validate(self, raw: bytes | None) -> Any:
        raise NotImplementedError

    def handle(self, items: list[tuple[Any, ConsumerRecord]]) -> list[Outgoing]:
        raise NotImplementedError

    def idle(self) -> None:
        """Called after each poll; for periodic work."""

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        backoff = 0.5
        while not self.stop_event.is_set():
            batch = self.consumer.poll(timeout_ms=self.poll_timeout_ms)
            records = [r for part in batch.values() for r in part]
            if records:
                try:
                    self.process(records)
                    backoff = 0.5
                except Exception:
                    self.stats.failures += 1
                    metrics.BATCH_FAILURES.labels(self.name).inc()
                    log.exception(
                        "%s: batch of %d failed; retrying in %.1f s",
                        self.name,
                        len(records),
                        backoff,
                    )
                    self.rewind(records)
                    self.stop_event.wait(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
                    continue
            self.record_lag()
            self.idle()

    def process(self, records: list[ConsumerRecord]) -> None:
        valid: list[tuple[Any, ConsumerRecord]] = []
        outgoing: list[Outgoing] = []
        for record in records:
            try:
                valid.append((self.validate(record.value), record))
            except InvalidEvent as exc:
                self.stats.invalid += 1
                metrics.DLQ.labels(record.topic).inc()
                log.warning(
                    "%s: %s[%d]@%d to the DLQ: %s",
                    self.name,
                    record.topic,
                    record.partition,
                    record.offset,
                    exc,
                )
                outgoing.append(
                    Outgoing(
                        self.dlq_topic,
                        record.key,
                        dlq_record(
                            record.key,
                            record.value,
                            str(exc),
                            record.topic,
                            record.partition,
                            record.offset,
                        ),
                    )
                )
        if valid:
            outgoing.extend(self.handle(valid))
        futures = [self.producer.send(o.topic, key=o.key, value=o.value) for o in outgoing]
        self.producer.flush()
        for future in futures:
            future.get(timeout=30)  # raises if the broker did not take it
        self.consumer.commit()
        self.stats.batches += 1
        self.stats.events += len(records)

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
            self.consumer.seek(tp, offset)

    def stop(self) -> None:
        self.stop_event.set()


def run_in_thread(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread
