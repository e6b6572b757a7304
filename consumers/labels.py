"""The label consumer: joins labels to decisions, stores rewards, updates the policy."""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord

from consumers.batch import BatchConsumer, Outgoing
from service import metrics
from service.events import LabelEvent
from service.log.labels import Source
from service.log.read_models import labeled_by_arm
from service.log.transaction import last_reward_seq
from service.pipeline import Learner

log = logging.getLogger(__name__)


class LabelConsumer(BatchConsumer):
    name = "labels"

    def __init__(
        self,
        learner: Learner,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        dlq_topic: str,
        expire_every_s: float = 60.0,
    ) -> None:
        super().__init__(consumer, producer, dlq_topic)
        self.learner = learner
        self.expire_every_s = expire_every_s
        self._next_expiry = 0.0
        self._next_gauge = 0.0
        self._next_learning_gauges = 0.0

    def validate(self, raw: bytes | None) -> LabelEvent:
        return self.learner.validate(raw)

    def handle(self, items: list[tuple[LabelEvent, ConsumerRecord]]) -> list[Outgoing]:
        stats = self.learner.learn(
            [event for event, _ in items],
            [Source(r.topic, r.partition, r.offset) for _, r in items],
            self.consumer.config["group_id"],
        )
        # outside their decision's label set: to the DLQ with the reason, never applied
        return [self.dead_letter(items[i][1], r.reason) for i, r in stats.rejected]

    def periodic(self) -> None:
        now = time.monotonic()
        if now >= self._next_gauge:
            self._next_gauge = now + 5.0
            try:
                metrics.PENDING_LABELS.set(self.learner.pending_count())
            except Exception:
                log.exception("counting pending labels failed; will retry")
        if now >= self._next_learning_gauges:
            self._next_learning_gauges = now + metrics.LEARNING_REFRESH_S
            try:
                self.export_learning()
            except Exception:
                log.exception("reading the accuracy and policy gauges failed; will retry")
        if now >= self._next_expiry:
            self._next_expiry = now + self.expire_every_s
            try:
                self.learner.expire_pending()
            except Exception:
                log.exception("expiring pending labels failed; will retry")

    def export_learning(self) -> None:
        """Set the per-arm labeled/correct/reward gauges, and how far the policy is behind."""
        learning_log = self.learner.learning_log
        with learning_log.engine.connect() as conn:
            outcomes = labeled_by_arm(conn)
            last = last_reward_seq(conn)
        for gauge in (metrics.LABELED, metrics.CORRECT, metrics.MEAN_REWARD):
            gauge.clear()  # only this database's arms (not those of a service before it)
        for o in outcomes:
            metrics.LABELED.labels(o.arm).set(o.labeled)
            metrics.CORRECT.labels(o.arm).set(o.correct)
            if o.mean_reward is not None:
                metrics.MEAN_REWARD.labels(o.arm).set(o.mean_reward)
        live = learning_log.live
        metrics.POLICY_LAG.set(max(0, last - live.watermark))
        metrics.POLICY_UPDATES.set(live.policy.n_updates)
