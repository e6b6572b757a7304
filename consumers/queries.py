"""The query consumer: decides each query event and publishes one decision event per decision."""

from __future__ import annotations

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord

from consumers.batch import Outgoing
from consumers.group_commit import GroupCommitConsumer
from service.events import QueryEvent
from service.pipeline import Decider, QueryRecord
from service.settings import QUERY_BATCHES_HELD


class QueryConsumer(GroupCommitConsumer):
    """Decides queries by group commit (:mod:`consumers.group_commit`): a query is stored and
    its decision published in the first group after its own LLM call ended."""

    name = "queries"
    # with group commit off (METALLM_GROUP_COMMIT_MS=0): the next batches' LLMs are called
    # while this one is stored. Two, so that a batch slow to store or publish (Postgres, the
    # broker: 50–350 ms now and then) does not leave the embedder idle meanwhile
    lookahead = QUERY_BATCHES_HELD - 1

    def __init__(
        self,
        decider: Decider,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        decisions_topic: str,
        dlq_topic: str,
        commit_interval_ms: int = 50,
    ) -> None:
        super().__init__(consumer, producer, dlq_topic, commit_interval_ms)
        self.decider = decider
        self.decisions_topic = decisions_topic

    def validate(self, raw: bytes | None) -> QueryEvent:
        return self.decider.validate(raw)

    def prepare(self, events: list[QueryEvent]) -> None:
        self.decider.call_ahead(events)

    def ready(self, event: QueryEvent) -> bool:
        return self.decider.call_ended(event)

    def abandon(self, records: list[ConsumerRecord]) -> None:
        ids = []
        for record in records:
            try:
                ids.append(self._event(record).query_id)
            except Exception:  # noqa: S112 - an invalid event has no call to abandon
                continue
        self.decider.abandon(ids)

    def handle(self, items: list[tuple[QueryEvent, ConsumerRecord]]) -> list[Outgoing]:
        decided = self.decider.decide(
            [QueryRecord(event, record.partition, record.offset) for event, record in items]
        )
        # an id taken by another query: to the DLQ, so an app never gets another's answer
        rejected = [self.dead_letter(items[i][1], reason) for i, reason in decided.rejected]
        # a redelivered query's decision was stored before, but its event may not have reached
        # the broker (a crash between the two): publish it again (consumers dedupe by query_id)
        return rejected + [
            Outgoing(self.decisions_topic, d.query_id.encode(), d.to_bytes())
            for d in [*decided.again, *decided.new]
        ]
