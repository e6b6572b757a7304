"""Deciding and learning, independent of Kafka: the consumers hand batches of events in here.

Deciding a batch: skip queries already decided → embed → the policy picks an arm (with its
propensity) → call the arms concurrently → one transaction stores the decisions and applies any
labels that arrived before them. Learning: join each label to its decision, store the reward,
update the policy; a label with no decision yet waits in ``pending_labels``.

Calls ahead (:mod:`service.call_ahead`): ``call_ahead(events)`` starts the first half (embed
→ choose → call) of a batch that comes next, in the background, while the batch before it is
stored and committed; its ``decide`` then finds the calls made (or in flight) and only stores.
The LLM calls of two batches so overlap, within the gateway's bounds; what is stored and
committed, and in which order, does not change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from service import metrics, storage
from service.call_ahead import CallAhead, Called
from service.config import AppConfig
from service.context import ContextError
from service.decision import Decision, event_of
from service.events import DecisionEvent, InvalidEvent, LabelEvent, QueryEvent
from service.learning import LivePolicy, labels_match
from service.llm.gateway import Gateway
from service.reward import RewardSettings, reward
from service.storage import AppliedReward, LabelRow
from service.vector_cache import TextEmbedder, VectorCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryRecord:
    """A valid query with where it came from."""

    event: QueryEvent
    partition: int | None = None
    offset: int | None = None


@dataclass
class LabelStats:
    applied: int = 0
    duplicates: int = 0
    pending: int = 0
    pending_duplicates: int = 0
    redelivered: int = 0  # applied before (Kafka redelivered them): no effect this time
    rewards: list[AppliedReward] = field(default_factory=list)


def score_label(
    decision: Mapping[str, Any],
    label: str,
    labeled_at: datetime | None,
    rewards: RewardSettings,
    duplicates: int = 0,
) -> LabelRow:
    """Score a decision against its label. A failed or unparseable call is wrong (and still
    pays its cost). A decision rewarded at decision time (its arm failed) only gets its
    label: no second policy update."""
    qid = decision["query_id"]
    correct = decision["status"] == "ok" and labels_match(decision["prediction"], label)
    if decision.get("reward_seq") is not None:
        return LabelRow(qid, label, labeled_at, correct, extra_duplicates=duplicates)
    r = reward(correct, decision["cost_usd"], rewards.lam, rewards.cost_unit)
    return LabelRow(qid, label, labeled_at, correct, r, rewards.lam, duplicates)


class Decider:
    def __init__(
        self,
        config: AppConfig,
        engine: Engine,
        live: LivePolicy,
        embedder: TextEmbedder,
        gateway: Gateway,
        rewards: RewardSettings,
    ) -> None:
        self.config = config
        self.engine = engine
        self.live = live
        self.rewards = rewards
        self.calling = CallAhead(config, engine, live, embedder, gateway)

    @property
    def gateway(self) -> Gateway:
        return self.calling.gateway

    @property
    def vectors(self) -> VectorCache:
        return self.calling.vectors

    @property
    def llm_calls(self) -> int:
        return self.calling.llm_calls

    def validate(self, raw: bytes | None) -> QueryEvent:
        """Parse a raw query event, or raise :class:`InvalidEvent` with the reason."""
        event = QueryEvent.from_bytes(raw)
        if event.task not in self.config.tasks:
            known = ", ".join(sorted(self.config.tasks))
            raise InvalidEvent(f"unknown task {event.task!r}; configured tasks: {known}")
        task = self.config.tasks[event.task]
        if task.kind == "multiple_choice" and event.options and len(event.options) > 26:
            raise InvalidEvent("multiple choice takes at most 26 options")
        try:
            self.live.context.check(event.task, event.metadata)
        except ContextError as exc:
            raise InvalidEvent(str(exc)) from None
        return event

    def call_ahead(self, events: list[QueryEvent]) -> None:
        """Start the calls of a batch that comes next (see :class:`CallAhead`)."""
        self.calling.call_ahead(events)

    def decide(self, records: list[QueryRecord]) -> list[DecisionEvent]:
        """Decide every query of the batch not decided before; returns the new decisions."""
        unique: dict[str, QueryRecord] = {}
        for record in records:
            unique.setdefault(record.event.query_id, record)
        with self.engine.connect() as conn:
            done = storage.existing_query_ids(conn, unique)
        todo = [r for qid, r in unique.items() if qid not in done]
        if done:
            log.info("skipped %d queries already decided (redelivery)", len(done))
            self.calling.forget(done)
        if not todo:
            return []

        calls = self.calling.calls([r.event for r in todo])
        results = {r.event.query_id: c.result for r, c in zip(todo, calls, strict=True)}
        batch = [self._decision(record, call) for record, call in zip(todo, calls, strict=True)]
        started = time.monotonic()
        with self.engine.begin() as conn:
            # numbers the decisions and rewards in commit order
            storage.lock_learning_log(conn, self.live.instance)
            self.live.sync_decisions(conn)  # so λ is the log's, whichever instance stores
            rewards = self.live.reward_settings(self.rewards)
            # a failed arm is rewarded now (wrong, at no cost: a failed request returns no
            # usage); its label, when it comes, does not count again
            stored = storage.store_decisions(
                conn,
                batch,
                failed=[q for q, result in results.items() if result.arm_failed],
                failure_reward=reward(False, 0.0, rewards.lam, rewards.cost_unit),
                lam=rewards.lam,
                score=lambda decision, label: score_label(
                    decision, label["label"], label["labeled_at"], rewards, label["duplicates"]
                ),
            )
        self.live.stored(stored.rewards, stored.logged, since=started)
        self.calling.forget(r.event.query_id for r in todo)
        if stored.early_labels:
            log.info("stored %d labels that arrived before their decisions", stored.early_labels)
        lost = len(batch) - len(stored.inserted)
        if lost:  # called for, but another instance stored these queries' decisions first
            metrics.CALLS_DISCARDED.labels("decided_elsewhere").inc(lost)
            log.warning("%d calls discarded: their queries were decided elsewhere meanwhile", lost)
        return [d.event() for d in batch if d.query_id in stored.inserted]

    def abandon(self, query_ids: list[str]) -> int:
        """Give up the calls started for these queries (see :meth:`CallAhead.abandon`)."""
        return self.calling.abandon(query_ids)

    def stored_events(self, query_ids: list[str]) -> list[DecisionEvent]:
        """The decision events of queries already decided, from Postgres (to publish again
        when their query is redelivered: the first publication may have been lost)."""
        if not query_ids:
            return []
        with self.engine.connect() as conn:
            rows = storage.decision_events(conn, query_ids)
        return [event_of(row) for row in rows]

    def _decision(self, record: QueryRecord, call: Called) -> Decision:
        choice, result = call.choice, call.result
        event = record.event
        return Decision(
            **{
                "query_id": event.query_id,
                "task": event.task,
                "text": event.text,
                "options": call.request.prompt.labels,
                "metadata": event.metadata,
                "sent_at": event.sent_at,
                "decided_at": datetime.now(UTC),
                "arm": choice.arm,
                "propensity": choice.propensity,
                "probabilities": choice.probabilities,
                "policy": self.live.policy_name,
                "status": result.status,
                "prediction": result.prediction,
                "raw_output": result.raw_output,
                "error": result.error,
                "input_tokens": result.input_tokens,
                "output_tokens": result.output_tokens,
                "cost_usd": result.cost_usd,
                "latency_ms": result.latency_ms,
                "attempts": result.attempts,
                "fallback_arm": result.fallback_arm,
                "answer_scores": result.answer_scores,
                "arm_scores": choice.scores,
                "embedding_model": self.vectors.name,
                "context": storage.vector_to_bytes(call.context),
                "context_layout": call.layout,
                "kafka_partition": record.partition,
                "kafka_offset": record.offset,
                "instance": self.live.instance,
                "rng_seed": self.live.rng_seed,
            }
        )

    def close(self) -> None:
        """Let the calls in flight finish, then close the arms' clients and the threads."""
        self.calling.close()


class Learner:
    """Applies label events: exactly once per decision, early labels kept until it lands."""

    def __init__(
        self, engine: Engine, live: LivePolicy, rewards: RewardSettings, pending_ttl_seconds: float
    ) -> None:
        self.engine = engine
        self.live = live
        self.rewards = rewards
        self.pending_ttl_seconds = pending_ttl_seconds

    @staticmethod
    def validate(raw: bytes | None) -> LabelEvent:
        return LabelEvent.from_bytes(raw)

    def learn(
        self,
        labels: list[LabelEvent],
        sources: list[tuple[str, int, int]] | None = None,
        group: str = "",
    ) -> LabelStats:
        """Apply label events. ``sources`` gives each one's (topic, partition, offset): the
        progress of ``group`` is then stored in the same transaction, and an event applied
        before (redelivered after a crash) changes nothing, not even the duplicate counters."""
        stats = LabelStats()
        if not labels:
            return stats
        delays: list[float] = []  # decision → label, for labels that found their decision
        started = time.monotonic()
        with self.engine.begin() as conn:
            # see storage.lock_learning_log: the join is safe
            storage.lock_learning_log(conn, self.live.instance)
            self.live.sync_decisions(conn)
            rewards = self.live.reward_settings(self.rewards)
            redelivered = [False] * len(labels)
            if sources:
                done = storage.applied_label_offsets(conn, group, {s[:2] for s in sources})
                redelivered = [o < done.get((t, p), 0) for t, p, o in sources]
            found = storage.decisions_for_labels(conn, [e.query_id for e in labels])
            waiting = storage.pending_label_ids(  # redelivered labels already kept
                conn,
                [
                    e.query_id
                    for e, again in zip(labels, redelivered, strict=True)
                    if again and e.query_id not in found
                ],
            )
            by_query: dict[str, list[LabelEvent]] = {}  # the first label of a query wins
            for event, again in zip(labels, redelivered, strict=True):
                decision = found.get(event.query_id)
                if again and (
                    event.query_id in waiting if decision is None else decision["label"] is not None
                ):
                    stats.redelivered += 1  # its effect is already there
                    continue
                by_query.setdefault(event.query_id, []).append(event)
            pending: list[tuple[str, str, datetime | None, int]] = []
            duplicates: dict[str, int] = {}
            scored: list[tuple[Mapping[str, Any], LabelRow]] = []
            for qid, (first, *rest) in by_query.items():
                decision = found.get(qid)
                kept = first.label if decision is None or decision["label"] is None else None
                for event in [first, *rest] if kept is None else rest:
                    if not labels_match(kept or decision["label"], event.label):
                        log.warning(
                            "conflicting label for %s: kept %r, ignored %r",
                            qid,
                            kept or decision["label"],
                            event.label,
                        )
                if decision is None:
                    pending.append((qid, first.label, first.labeled_at, len(rest)))
                elif decision["label"] is not None:
                    duplicates[qid] = 1 + len(rest)
                    stats.duplicates += 1 + len(rest)
                else:
                    scored.append(
                        (
                            decision,
                            score_label(
                                decision, first.label, first.labeled_at, rewards, len(rest)
                            ),
                        )
                    )
                    stats.duplicates += len(rest)
                    stats.applied += 1
                    delays.append((datetime.now(UTC) - decision["decided_at"]).total_seconds())
            new = storage.add_pending_labels(conn, pending)
            for qid, _, _, extra in pending:
                stats.pending += new[qid]
                stats.pending_duplicates += extra + (not new[qid])
            storage.count_duplicate_labels(conn, duplicates)
            stats.rewards = storage.store_labels(conn, scored)
            dupes = stats.duplicates + stats.pending_duplicates
            if dupes:
                storage.bump_counter(conn, "duplicate_labels", dupes)
            if sources:
                after: dict[tuple[str, int], int] = {}
                for topic, partition, offset in sources:
                    tp = (topic, partition)
                    after[tp] = max(after.get(tp, 0), offset + 1)
                storage.record_label_offsets(conn, group, after)
        self.live.stored(stats.rewards, since=started)
        if stats.redelivered:
            log.info("%d labels were redelivered and had been applied already", stats.redelivered)
        for delay in delays:
            metrics.LABEL_DELAY.observe(delay)
        return stats

    def pending_count(self) -> int:
        with self.engine.connect() as conn:
            return storage.count_pending_labels(conn)

    def expire_pending(self) -> int:
        """Drop labels that waited longer than the TTL for their decision."""
        with self.engine.begin() as conn:
            dropped = storage.expire_pending_labels(conn, self.pending_ttl_seconds)
            if dropped:
                storage.bump_counter(conn, "labels_expired", len(dropped))
        for row in dropped:
            log.warning(
                "dropped label for %s: no decision within %.0f s (received %s)",
                row["query_id"],
                self.pending_ttl_seconds,
                row["received_at"].isoformat(),
            )
        return len(dropped)
