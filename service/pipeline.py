"""Deciding and learning, independent of Kafka: the consumers hand batches of events in here.

Deciding a batch: skip queries already decided → embed → the policy picks an arm (with its
propensity) → call the arms concurrently → one transaction stores the decisions and applies any
labels that arrived before them. Learning: join each label to its decision, store the reward,
update the policy; a label with no decision yet waits in ``pending_labels``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy.engine import Connection, Engine

from service import metrics, storage
from service.config import AppConfig
from service.embed_ahead import EmbedAhead, TextEmbedder
from service.events import DecisionEvent, InvalidEvent, LabelEvent, QueryEvent
from service.learning import LivePolicy, labels_match
from service.llm.base import CallRequest
from service.llm.gateway import CallResult, Gateway
from service.reward import RewardSettings, reward
from service.storage import AppliedReward
from service.tasks import build_prompt

log = logging.getLogger(__name__)

MAX_UNSTORED = 10_000  # calls kept for decisions whose batch failed before storing them


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


def store_failure_reward(
    conn: Connection, decision: dict[str, Any], rewards: RewardSettings
) -> AppliedReward:
    """The policy's reward for a chosen arm that failed, stored at decision time: wrong, at
    the chosen arm's cost (a failed request returns no usage, so 0), whatever the label."""
    r = reward(False, 0.0, rewards.lam, rewards.cost_unit)
    seq = storage.record_failure_reward(conn, decision["query_id"], r, rewards.lam)
    decision["reward_seq"] = seq
    return AppliedReward(
        seq, decision["query_id"], decision["arm"], storage.bytes_to_vector(decision["context"]), r
    )


def store_reward(
    conn: Connection,
    decision: dict[str, Any],
    label: str,
    labeled_at: datetime | None,
    rewards: RewardSettings,
    duplicates: int = 0,
) -> AppliedReward | None:
    """Score a decision against its label and store label, correctness and reward on its row.
    A failed or unparseable call is wrong (and still pays its cost). A decision rewarded at
    decision time (its arm failed) only gets its label: None, no second policy update."""
    correct = decision["status"] == "ok" and labels_match(decision["prediction"], label)
    if decision.get("reward_seq") is not None:
        storage.record_label(conn, decision["query_id"], label, labeled_at, correct, duplicates)
        return None
    r = reward(correct, decision["cost_usd"], rewards.lam, rewards.cost_unit)
    seq = storage.record_reward(
        conn, decision["query_id"], label, labeled_at, correct, r, rewards.lam, duplicates
    )
    return AppliedReward(
        seq, decision["query_id"], decision["arm"], storage.bytes_to_vector(decision["context"]), r
    )


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
        self.ahead = EmbedAhead(embedder)  # every embedding goes through it
        self.gateway = gateway
        self.rewards = rewards
        self.llm_calls = 0
        self._loop = asyncio.new_event_loop()
        # calls made for decisions not stored yet (the batch failed after calling: Postgres
        # down, say): a retry reuses them, so a query is never sent twice by this process
        self._unstored: dict[str, tuple[QueryEvent, Any, CallResult, np.ndarray, CallRequest]] = {}

    def validate(self, raw: bytes | None) -> QueryEvent:
        """Parse a raw query event, or raise :class:`InvalidEvent` with the reason."""
        event = QueryEvent.from_bytes(raw)
        if event.task not in self.config.tasks:
            known = ", ".join(sorted(self.config.tasks))
            raise InvalidEvent(f"unknown task {event.task!r}; configured tasks: {known}")
        task = self.config.tasks[event.task]
        if task.kind == "multiple_choice" and event.options and len(event.options) > 26:
            raise InvalidEvent("multiple choice takes at most 26 options")
        return event

    def embed_ahead(self, texts: list[str]) -> None:
        """Start embedding texts of a batch that comes next, in the background: ``decide``
        then finds their vectors ready (it embeds whatever was not)."""
        self.ahead.submit(texts)

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
        if not todo:
            return []

        self._call(todo)
        calls = [self._unstored[r.event.query_id] for r in todo]
        results = [result for _, _, result, _, _ in calls]
        rows = [
            self._row(record, choice, result, context, request)
            for record, (_, choice, result, context, request) in zip(todo, calls, strict=True)
        ]
        with self.live.lock:
            rewards = self.live.reward_settings(self.rewards)
            with self.engine.begin() as conn:
                inserted = storage.insert_decisions(conn, rows)
                costs = storage.decision_costs(conn, inserted)
                by_id = {row["query_id"]: row for row in rows}
                applied = [  # a failed arm is rewarded now; its label will not count again
                    store_failure_reward(conn, row, rewards)
                    for row, result in zip(rows, results, strict=True)
                    if row["query_id"] in inserted and result.arm_failed
                ]
                early = storage.take_pending_labels(conn, inserted)
                for pending in early:
                    row = by_id[pending["query_id"]]
                    stored = store_reward(
                        conn,
                        row,
                        pending["label"],
                        pending["labeled_at"],
                        rewards,
                        pending["duplicates"],
                    )
                    if stored is not None:
                        applied.append(stored)
            self.live.observe_costs(costs)
            self.live.apply(applied)
        for record in todo:
            self._unstored.pop(record.event.query_id, None)
        if early:
            log.info("stored %d labels that arrived before their decisions", len(early))
        return [self._event(row) for row in rows if row["query_id"] in inserted]

    def _call(self, todo: list[QueryRecord]) -> None:
        """Embed, choose an arm and call it for each query of ``todo`` not already called for
        (an earlier attempt at this batch may have called, then failed to store)."""
        fresh = [
            r
            for r in todo
            if r.event.query_id not in self._unstored
            or self._unstored[r.event.query_id][0] != r.event
        ]
        if fresh:
            contexts = self.ahead.embed([r.event.text for r in fresh])
            arms = self.gateway.available_arms()
            with self.live.lock:
                choices = self.live.policy.choose_many(arms, contexts.astype(np.float64))
            requests = []
            for record in fresh:
                task = self.config.tasks[record.event.task]
                options = record.event.options or task.labels
                prompt = build_prompt(task, record.event.text, options)
                requests.append(CallRequest(record.event.query_id, prompt))
            results = self._loop.run_until_complete(self._call_all(choices, requests))
            self.llm_calls += len(results)
            for record, choice, result, context, request in zip(
                fresh, choices, results, contexts, requests, strict=True
            ):
                self._unstored[record.event.query_id] = (
                    record.event,
                    choice,
                    result,
                    context,
                    request,
                )
        elif todo:
            log.info("reusing the calls already made for %d queries not stored yet", len(todo))
        while len(self._unstored) > MAX_UNSTORED:  # bounded: oldest first
            self._unstored.pop(next(iter(self._unstored)))

    def stored_events(self, query_ids: list[str]) -> list[DecisionEvent]:
        """The decision events of queries already decided, from Postgres (to publish again
        when their query is redelivered: the first publication may have been lost)."""
        if not query_ids:
            return []
        with self.engine.connect() as conn:
            rows = storage.decisions_by_id(conn, query_ids)
        return [self._event(row) for row in rows]

    async def _call_all(self, choices: list, requests: list[CallRequest]) -> list[CallResult]:
        calls = (self.gateway.call(c.arm, r) for c, r in zip(choices, requests, strict=True))
        return list(await asyncio.gather(*calls))

    def _row(
        self,
        record: QueryRecord,
        choice,
        result: CallResult,
        context: np.ndarray,
        request: CallRequest,
    ) -> dict[str, Any]:
        event = record.event
        return {
            "query_id": event.query_id,
            "task": event.task,
            "text": event.text,
            "options": request.prompt.labels,
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
            "embedding_model": self.ahead.name,
            "context": storage.vector_to_bytes(context),
            "kafka_partition": record.partition,
            "kafka_offset": record.offset,
        }

    @staticmethod
    def _event(row: dict[str, Any]) -> DecisionEvent:
        return DecisionEvent(
            query_id=row["query_id"],
            task=row["task"],
            arm=row["arm"],
            propensity=row["propensity"],
            probabilities=row["probabilities"],
            prediction=row["prediction"],
            status=row["status"],
            cost_usd=row["cost_usd"],
            latency_ms=row["latency_ms"],
            decided_at=row["decided_at"],
            attempts=row.get("attempts") or 1,
            fallback_arm=row.get("fallback_arm"),
        )

    def close(self) -> None:
        self.ahead.close()
        self._loop.run_until_complete(self.gateway.aclose())  # HTTP pools live on this loop
        self._loop.close()


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
        with self.live.lock:
            rewards = self.live.reward_settings(self.rewards)
            with self.engine.begin() as conn:
                again = [False] * len(labels)
                if sources:
                    done = storage.applied_label_offsets(conn, group, {s[:2] for s in sources})
                    again = [o < done.get((t, p), 0) for t, p, o in sources]
                for event, redelivered in zip(labels, again, strict=True):
                    decision = storage.decision_for_label(conn, event.query_id)
                    if redelivered and (
                        storage.has_pending_label(conn, event.query_id)
                        if decision is None
                        else decision["label"] is not None
                    ):
                        stats.redelivered += 1  # its effect is already there
                        continue
                    if decision is None:
                        if storage.add_pending_label(
                            conn, event.query_id, event.label, event.labeled_at
                        ):
                            stats.pending += 1
                        else:
                            stats.pending_duplicates += 1
                    elif decision["label"] is not None:
                        storage.count_duplicate_label(conn, event.query_id)
                        stats.duplicates += 1
                        if not labels_match(decision["label"], event.label):
                            log.warning(
                                "conflicting label for %s: kept %r, ignored %r",
                                event.query_id,
                                decision["label"],
                                event.label,
                            )
                    else:
                        stored = store_reward(
                            conn, decision, event.label, event.labeled_at, rewards
                        )
                        if stored is not None:
                            stats.rewards.append(stored)
                        stats.applied += 1
                        delays.append((datetime.now(UTC) - decision["decided_at"]).total_seconds())
                dupes = stats.duplicates + stats.pending_duplicates
                if dupes:
                    storage.bump_counter(conn, "duplicate_labels", dupes)
                if sources:
                    after: dict[tuple[str, int], int] = {}
                    for topic, partition, offset in sources:
                        tp = (topic, partition)
                        after[tp] = max(after.get(tp, 0), offset + 1)
                    storage.record_label_offsets(conn, group, after)
            self.live.apply(stats.rewards)
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
