"""Deciding and learning, independent of Kafka: the consumers hand batches of events in here.

Deciding a batch: skip queries already decided (a committed decision is never called again:
its stored event is published again instead) → embed → the policy picks an arm (with its
propensity) → call the arms concurrently → one transaction stores the decisions and applies any
labels that arrived before them. Learning: join each label to its decision, store the reward,
update the policy; a label with no decision yet waits in ``pending_labels``. Both write through
the learning log's one append transaction (:meth:`LearningLog.append`).

Calls ahead (:mod:`service.call_ahead`): ``call_ahead(events)`` starts the first half (embed
→ choose → call) of queries as soon as they are polled, in the background; ``decide`` then
finds the calls made (or in flight) and only stores. The query consumer stores by group commit
(:mod:`consumers.group_commit`): it asks :meth:`Decider.call_ended` which queries held need no
more waiting and calls ``decide`` on those, so an answer waits for its own call only. Any
caller may ``decide`` any list of queries (one query, a whole batch): it waits for their calls.

A committed decision is never called again (invariant 5): ``decide`` asks Postgres which
queries are decided before calling (their stored events are returned to publish again), and a
process calls a query at most once (its call is kept until its decision is stored).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from service import metrics
from service.call_ahead import CallAhead, Called
from service.config import AppConfig
from service.context import ContextError
from service.decision import Decision, vector_to_bytes
from service.events import DecisionEvent, InvalidEvent, LabelEvent, QueryEvent
from service.llm.gateway import Gateway
from service.llm.streaming import Relay
from service.log import decisions as decision_sql
from service.log import labels as label_sql
from service.log.join import join_labels
from service.log.labels import LabelStats, Source
from service.log.requests import reserved_ids
from service.log.rows import StoredQuery
from service.log.transaction import LearningLog
from service.pricing import priced_columns
from service.query_checks import difference, query_of, too_long_reason, truncated
from service.reward import RewardSettings
from service.tasks import build_prompt
from service.vector_cache import TextEmbedder, VectorCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryRecord:
    """A valid query with where it came from."""

    event: QueryEvent
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True)
class Decided:
    """What deciding a batch gives to publish: the new decisions, the stored ones of queries
    decided before (redelivered or sent again: their first publication may have been lost),
    and the events (by index in the batch) rejected with the reason: their id is taken."""

    new: list[DecisionEvent]
    again: list[DecisionEvent]
    rejected: list[tuple[int, str]] = field(default_factory=list)


def _count_decided(decisions: list[Decision]) -> None:
    """The decision metrics of newly stored decisions, whichever door they came in by."""
    for d in decisions:
        metrics.DECISIONS.labels(d.arm, d.status).inc()
        metrics.COST.labels(d.arm).inc(d.cost_usd)
        if d.latency_ms is not None:
            metrics.LLM_LATENCY.labels(d.arm).observe(d.latency_ms / 1000)


def _repeated(events: list[DecisionEvent], query_ids: list[str]) -> list[DecisionEvent]:
    """The decision of each id in ``query_ids`` (of those among ``events``), in that order."""
    by_id = {e.query_id: e for e in events}
    return [by_id[q] for q in query_ids if q in by_id]


class Decider:
    def __init__(
        self,
        config: AppConfig,
        learning_log: LearningLog,
        embedder: TextEmbedder,
        gateway: Gateway,
        rewards: RewardSettings,
        too_long_text: str = "dlq",
    ) -> None:
        self.config = config
        self.learning_log = learning_log
        self.rewards = rewards
        self.too_long_text = too_long_text  # a text that fits no arm: "dlq" or "truncate"
        self.calling = CallAhead(
            config, learning_log.engine, learning_log.live, embedder, gateway, rewards
        )

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
        return self.check(QueryEvent.from_bytes(raw))

    def check(self, event: QueryEvent) -> QueryEvent:
        """The event if this service can route it (its task, options, metadata; its prompt cut
        to fit where the setting says so), or :class:`InvalidEvent` with the reason."""
        if event.task not in self.config.tasks:
            known = ", ".join(sorted(self.config.tasks))
            raise InvalidEvent(f"unknown task {event.task!r}; configured tasks: {known}")
        task = self.config.tasks[event.task]
        if task.kind == "multiple_choice" and event.options and len(event.options) > 26:
            raise InvalidEvent("multiple choice takes at most 26 options")
        if task.is_open and event.options:
            raise InvalidEvent(f"task {event.task!r} is open-ended: its queries take no options")
        try:
            self.learning_log.live.context.check(event.task, event.metadata)
        except ContextError as exc:
            raise InvalidEvent(str(exc)) from None
        return self._fitting(event)

    def _fitting(self, event: QueryEvent) -> QueryEvent:
        """The event if some arm's context window holds its prompt; else, by the setting,
        rejected with the reason or its text cut to fit the largest window."""
        task = self.config.tasks[event.task]
        prompt = build_prompt(task, event.text, event.options or task.labels).text
        reason = too_long_reason(self.config, prompt, task.output_tokens)
        if reason is None:
            return event
        if self.too_long_text != "truncate":
            raise InvalidEvent(reason)
        text = truncated(event.text, prompt, self.config, task.output_tokens)
        log.info(
            "%s: text cut from %d to %d characters", event.query_id, len(event.text), len(text)
        )
        return event.model_copy(update={"text": text})

    def call_ahead(self, events: list[QueryEvent]) -> None:
        """Start the calls of a batch that comes next (see :class:`CallAhead`)."""
        self.calling.call_ahead(events)

    def decide(self, records: list[QueryRecord]) -> Decided:
        """Decide every query of the batch not decided before. Returns the new decisions, the
        stored decisions of the queries decided before or repeated in the batch (in the
        batch's order), and the events whose id is taken by another query."""
        engine = self.learning_log.engine
        with engine.connect() as conn:
            ids = {r.event.query_id for r in records}
            taken = decision_sql.stored_queries(conn, ids)
            held = reserved_ids(conn, ids - taken.keys())  # by the HTTP door, calling for them
        unique, repeats, rejected = self._check_ids(records, taken, held)
        with engine.connect() as conn:
            again = decision_sql.decision_events(conn, [q for q in unique if q in taken])
        done = {e.query_id for e in again}
        todo = [r for qid, r in unique.items() if qid not in done]
        if done:
            log.info("skipped %d queries already decided (redelivery)", len(done))
            metrics.QUERIES_AGAIN.labels("republished").inc(len(done))
            self.calling.forget(done)
        if not todo:
            return Decided([], again + _repeated(again, repeats), rejected)

        calls = self.calling.calls([r.event for r in todo])
        batch = [self._decision(record, call) for record, call in zip(todo, calls, strict=True)]
        failed = [d.query_id for d, c in zip(batch, calls, strict=True) if c.result.arm_failed]
        with self.learning_log.append(self.rewards) as tx:
            stored = decision_sql.store_decisions(tx.conn, batch, failed, tx.rewards)
            tx.applied += stored.rewards
            tx.logged += stored.logged
        self.calling.forget(r.event.query_id for r in todo)
        if stored.early_labels:
            log.info("stored %d labels that arrived before their decisions", stored.early_labels)
        _log_early(stored)
        lost = [d.query_id for d in batch if d.query_id not in stored.inserted]
        if lost:  # called for, but another instance stored these queries' decisions first
            metrics.CALLS_DISCARDED.labels("decided_elsewhere").inc(len(lost))
            log.warning(
                "%d calls discarded: their queries were decided elsewhere meanwhile", len(lost)
            )
            with engine.connect() as conn:
                again += decision_sql.decision_events(conn, lost)
            order = {qid: i for i, qid in enumerate(unique)}
            again.sort(key=lambda e: order[e.query_id])
        _count_decided([d for d in batch if d.query_id in stored.inserted])
        new = [d.event() for d in batch if d.query_id in stored.inserted]
        return Decided(new, again + _repeated(again + new, repeats), rejected)

    def _check_ids(
        self, records: list[QueryRecord], taken: dict[str, StoredQuery], held: set[str]
    ) -> tuple[dict[str, QueryRecord], list[str], list[tuple[int, str]]]:
        """Each id's query is the one stored (``taken``), else its first event in the batch.
        Returns the events to decide or publish again (the first of each id that is its
        query), the ids of the further events of the same query (published again), and the
        events (by index) whose id is taken by another query, or ``held`` by an HTTP request
        calling for it (its decision is that request's), with the reason."""
        unique: dict[str, QueryRecord] = {}
        repeats: list[str] = []
        rejected: list[tuple[int, str]] = []
        for i, record in enumerate(records):
            qid = record.event.query_id
            if qid in held:
                rejected.append((i, f"query id {qid!r} is being decided by an HTTP request"))
                continue
            query = query_of(record.event, self.config)
            known = taken.get(qid)
            if known is None and qid in unique:
                known = query_of(unique[qid].event, self.config)
            reason = None if known is None else difference(known, query, qid)
            if reason is not None:
                rejected.append((i, reason))
            elif qid in unique:
                repeats.append(qid)
            else:
                unique[qid] = record
        if repeats:
            log.info(
                "%d queries repeated in their batch: their decision is published again",
                len(repeats),
            )
        metrics.QUERIES_AGAIN.labels("republished").inc(len(repeats))
        metrics.QUERIES_AGAIN.labels("rejected").inc(len(rejected))
        return unique, repeats, rejected

    def call_one(
        self,
        event: QueryEvent,
        max_tokens: int | None = None,
        temperature: float | None = None,
        relay: Relay | None = None,
    ) -> tuple[Decision, bool]:
        """Call for one query now (the HTTP door's, already validated), from any thread, with
        the request's own ``max_tokens`` and ``temperature`` (its answer streamed to ``relay``
        when the arm can): its decision, not stored yet, and whether the chosen arm failed.
        :meth:`store` stores it."""
        call = self.calling.call_one(event, max_tokens, temperature, relay)
        return self._decision(QueryRecord(event), call), call.result.arm_failed

    def store(self, batch: list[Decision], failed: list[str]) -> set[str]:
        """Store decisions made by :meth:`call_one` in one append to the learning log (with
        the rewards of the arms that ``failed`` and the labels that waited for them), as a
        batch's are stored. Returns the ids stored (not those another instance stored first)."""
        with self.learning_log.append(self.rewards) as tx:
            stored = decision_sql.store_decisions(tx.conn, batch, failed, tx.rewards)
            tx.applied += stored.rewards
            tx.logged += stored.logged
        _log_early(stored)
        lost = len(batch) - len(stored.inserted)
        if lost:
            metrics.CALLS_DISCARDED.labels("decided_elsewhere").inc(lost)
        _count_decided([d for d in batch if d.query_id in stored.inserted])
        return set(stored.inserted)

    def call_ended(self, event: QueryEvent) -> bool:
        """Whether deciding ``event`` now would not wait for an LLM call: its call (started
        ahead) has ended, or there is none to wait for. A group commit stores such events
        (:meth:`decide` on them) while the calls of the others go on."""
        return self.calling.ended(event)

    def abandon(self, query_ids: list[str]) -> int:
        """Give up the calls started for these queries (see :meth:`CallAhead.abandon`)."""
        return self.calling.abandon(query_ids)

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
                "policy": self.learning_log.live.policy_name,
                "status": result.status,
                "prediction": result.prediction,
                "raw_output": result.raw_output,
                "error": result.error,
                "input_tokens": result.input_tokens,
                "output_tokens": result.output_tokens,
                "cost_usd": result.cost_usd,
                "latency_ms": result.latency_ms,
                "wait_ms": result.wait_ms,
                "attempts": result.attempts,
                "fallback_arm": result.fallback_arm,
                "answer_scores": result.answer_scores,
                "arm_scores": choice.scores,
                "embedding_model": self.vectors.name,
                "context": vector_to_bytes(call.context),
                "context_layout": call.layout,
                "kafka_partition": record.partition,
                "kafka_offset": record.offset,
                "instance": self.learning_log.instance,
                "rng_seed": self.learning_log.rng_seed,
                **priced_columns(choice.arm, call.pricing),
            }
        )

    def close(self) -> None:
        """Let the calls in flight finish, then close the arms' clients and the threads."""
        self.calling.close()


def _log_early(stored: decision_sql.StoredDecisions) -> None:
    """Log the early labels rejected, and the conflicts between the others of a query."""
    for r in stored.rejected_labels:
        where = (
            ""
            if r.source is None
            else f" ({r.source.topic}[{r.source.partition}]@{r.source.offset})"
        )
        log.warning(
            "label for %s rejected when its decision arrived%s: %s", r.query_id, where, r.reason
        )
    for c in stored.conflicts:
        log.warning("conflicting label for %s: kept %r, ignored %r", c.query_id, c.kept, c.ignored)


class Learner:
    """Applies label events: exactly once per decision, early labels kept until it lands."""

    def __init__(
        self, learning_log: LearningLog, rewards: RewardSettings, pending_ttl_seconds: float
    ) -> None:
        self.learning_log = learning_log
        self.rewards = rewards
        self.pending_ttl_seconds = pending_ttl_seconds

    @staticmethod
    def validate(raw: bytes | None) -> LabelEvent:
        return LabelEvent.from_bytes(raw)

    def learn(
        self, labels: list[LabelEvent], sources: list[Source] | None = None, group: str = ""
    ) -> LabelStats:
        """Apply label events. ``sources`` gives each one's (topic, partition, offset): the
        progress of ``group`` is then stored in the same transaction, and an event applied
        before (redelivered after a crash) changes nothing, not even the duplicate counters."""
        if not labels:
            return LabelStats(0, 0, 0, 0, 0, [])
        sources = [Source(*s) for s in sources] if sources else None
        with self.learning_log.append(self.rewards) as tx:  # the join is safe under its lock
            conn = tx.conn
            again = (
                label_sql.redelivered(conn, group, sources) if sources else [False] * len(labels)
            )
            found = label_sql.decisions_for_labels(conn, [e.query_id for e in labels])
            waiting = label_sql.waiting_labels(  # those of the early labels' queries
                conn, [e.query_id for e in labels if e.query_id not in found]
            )
            plan = join_labels(labels, found, waiting, again, tx.rewards, sources)
            now = datetime.now(UTC)
            delays = [(now - s.decision.decided_at).total_seconds() for s in plan.scored]
            stats = label_sql.apply_plan(conn, plan, group, sources)
            tx.applied += stats.rewards
        for c in plan.conflicts:
            log.warning(
                "conflicting label for %s: kept %r, ignored %r", c.query_id, c.kept, c.ignored
            )
        if stats.redelivered:
            log.info("%d labels were redelivered and had been applied already", stats.redelivered)
        for delay in delays:  # decision → label, for labels that found their decision
            metrics.LABEL_DELAY.observe(delay)
        return stats

    def pending_count(self) -> int:
        with self.learning_log.engine.connect() as conn:
            return label_sql.count_pending_labels(conn)

    def expire_pending(self) -> int:
        """Drop labels that waited longer than the TTL for their decision."""
        with self.learning_log.engine.begin() as conn:
            dropped = label_sql.expire_pending_labels(conn, self.pending_ttl_seconds)
            if dropped:
                label_sql.bump_counter(conn, "labels_expired", len(dropped))
        for row in dropped:
            log.warning(
                "dropped label for %s: no decision within %.0f s (received %s)",
                row.query_id,
                self.pending_ttl_seconds,
                row.received_at.isoformat(),
            )
        return len(dropped)
