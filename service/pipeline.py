"""Deciding and learning, independent of Kafka: the consumers hand batches of events in here.

Deciding a batch: skip queries already decided → embed → the policy picks an arm (with its
propensity) → call the arms concurrently → one transaction stores the decisions and applies any
labels that arrived before them. Learning: join each label to its decision, store the reward,
update the policy; a label with no decision yet waits in ``pending_labels``.

Calls ahead: ``call_ahead(events)`` starts the first half (embed → choose → call) of a batch
that comes next, in the background, while the batch before it is stored and committed; its
``decide`` then finds the calls made (or in flight) and only stores. The LLM calls of two
batches so overlap, within the gateway's bounds; what is stored and committed, and in which
order, does not change.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy.engine import Connection, Engine

from service import metrics, storage
from service.config import AppConfig
from service.context import ContextError
from service.events import DecisionEvent, InvalidEvent, LabelEvent, QueryEvent
from service.learning import LivePolicy, labels_match
from service.llm.base import CallRequest
from service.llm.gateway import CallResult, Gateway
from service.policy.base import Choice
from service.reward import RewardSettings, reward
from service.settings import MAX_QUERIES_KEPT
from service.storage import AppliedReward, LabelRow, LoggedDecision
from service.tasks import build_prompt
from service.vector_cache import TextEmbedder, VectorCache

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 60.0  # on close, how long calls still in flight may take to finish
EMBED_WORKERS = 2  # batches embedded (and chosen for) at once: see Decider.__init__


@dataclass(frozen=True)
class QueryRecord:
    """A valid query with where it came from."""

    event: QueryEvent
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True)
class Called:
    """One query's call: the arm chosen for it, the context it was chosen on, the answer."""

    choice: Choice
    context: np.ndarray
    layout: str  # the context's ContextLayout.spec
    request: CallRequest
    result: CallResult


@dataclass(frozen=True)
class _Pending:
    """A query whose call was started: ``job`` gives the whole batch's, this one at ``row``
    (None there: it was found decided before calling; an exception: that call failed)."""

    event: QueryEvent
    job: Future[list[Called | BaseException | None]]
    row: int

    def result(self) -> Called | BaseException | None:
        """Its call (waiting for it), the error it failed with, or None (found decided)."""
        try:
            return self.job.result()[self.row]
        except BaseException as exc:  # the whole job failed (embedding, Postgres, cancelled)
            return exc

    @property
    def failed(self) -> bool:
        """Whether it is known to have failed (a job not finished yet has not)."""
        return self.job.done() and isinstance(self.result(), BaseException)


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


def store_labels(
    conn: Connection, scored: list[tuple[Mapping[str, Any], LabelRow]]
) -> list[AppliedReward]:
    """Store scored labels on their decisions (one statement); returns the new rewards."""
    seqs = storage.store_labels(conn, [row for _, row in scored])
    return [
        _applied(seqs[row.query_id], decision, row.reward)
        for decision, row in scored
        if row.query_id in seqs and row.reward is not None
    ]


def _applied(seq: int, decision: Mapping[str, Any], r: float) -> AppliedReward:
    return AppliedReward(
        seq,
        decision["query_id"],
        decision["arm"],
        storage.bytes_to_vector(decision["context"]),
        r,
        decision.get("context_layout"),
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
        self.vectors = VectorCache(embedder)  # a cache: a retried batch is not embedded again
        self.gateway = gateway
        self.rewards = rewards
        self.llm_calls = 0
        # the calls run on an event loop of their own thread, so they go on while the
        # consumer stores the batch before. Embedding and choosing run on worker threads: two,
        # so the next batch is read from Postgres, tokenized and queued for the embedder while
        # the one before still embeds (the embedder's cores never wait between batches)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="metallm-llm-calls", daemon=True
        )
        self._loop_thread.start()
        self._worker = ThreadPoolExecutor(EMBED_WORKERS, thread_name_prefix="metallm-embed-choose")
        # calls started for queries not stored yet (ahead of their batch, or for a batch that
        # failed after calling: Postgres down, say): ``decide`` uses them, so a query is never
        # sent twice by this process. Only the consumer's thread reads or changes it.
        self._started: dict[str, _Pending] = {}

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
        """Start embedding, choosing an arm for and calling each query of a batch that comes
        next, and return at once: its ``decide`` then finds the calls made or in flight.
        Queries already decided (checked in Postgres first) or already called are skipped
        (a query id called for with other content too: ``decide`` sorts that out)."""
        fresh: dict[str, QueryEvent] = {}
        for event in events:
            pending = self._started.get(event.query_id)
            if pending is None or pending.failed:  # a failed job (Postgres down…) starts anew
                fresh.setdefault(event.query_id, event)
        if fresh:
            self._start(list(fresh.values()), skip_decided=True)

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
            for qid in done:
                self._started.pop(qid, None)
        if not todo:
            return []

        calls = self._calls([r.event for r in todo])
        results = {r.event.query_id: c.result for r, c in zip(todo, calls, strict=True)}
        rows = [self._row(record, call) for record, call in zip(todo, calls, strict=True)]
        started = time.monotonic()
        with self.engine.begin() as conn:
            storage.lock_learning_log(conn)  # numbers the decisions and rewards in commit order
            self.live.sync_decisions(conn)  # so λ is the log's, whichever instance stores
            rewards = self.live.reward_settings(self.rewards)
            inserted = storage.insert_decisions(conn, rows)  # query id → decision_seq
            by_id = {row["query_id"]: row for row in rows}
            logged = [
                LoggedDecision(
                    seq,
                    float(by_id[q]["cost_usd"]),
                    by_id[q]["task"],
                    len(by_id[q]["text"]),
                    by_id[q]["metadata"],
                )
                for q, seq in inserted.items()
            ]
            # a failed arm is rewarded now (wrong, at no cost: a failed request returns no
            # usage); its label, when it comes, does not count again
            failed = [q for q in inserted if results[q].arm_failed]
            r_failed = reward(False, 0.0, rewards.lam, rewards.cost_unit)
            seqs = storage.store_failure_rewards(conn, failed, r_failed, rewards.lam)
            applied = [_applied(seq, by_id[q], r_failed) for q, seq in seqs.items()]
            early = storage.take_pending_labels(conn, inserted)
            scored = [
                (
                    decision := {**by_id[p["query_id"]], "reward_seq": seqs.get(p["query_id"])},
                    score_label(decision, p["label"], p["labeled_at"], rewards, p["duplicates"]),
                )
                for p in early
            ]
            applied += store_labels(conn, scored)
        self.live.stored(applied, logged, since=started)
        for record in todo:
            self._started.pop(record.event.query_id, None)
        if early:
            log.info("stored %d labels that arrived before their decisions", len(early))
        lost = len(rows) - len(inserted)
        if lost:  # called for, but another instance stored these queries' decisions first
            metrics.CALLS_DISCARDED.labels("decided_elsewhere").inc(lost)
            log.warning("%d calls discarded: their queries were decided elsewhere meanwhile", lost)
        return [self._event(row) for row in rows if row["query_id"] in inserted]

    def abandon(self, query_ids: list[str]) -> int:
        """Forget the calls started for queries this instance will not store (a rebalance
        gave their partition to another instance, which calls again): counted in
        ``metallm_calls_discarded{reason="rebalance"}`` and logged with their cost so far."""
        dropped = [p for q in dict.fromkeys(query_ids) if (p := self._started.pop(q, None))]
        if not dropped:
            return 0
        cost = sum(
            c.result.cost_usd
            for p in dropped
            if p.job.done() and isinstance(c := p.result(), Called)
        )
        metrics.CALLS_DISCARDED.labels("rebalance").inc(len(dropped))
        log.warning(
            "%d calls discarded at a rebalance (their queries go to another instance; "
            "USD %.6f spent on those that had answered)",
            len(dropped),
            cost,
        )
        return len(dropped)

    # ------------------------------------------------------------------ calling
    def _not_started(self, events: list[QueryEvent]) -> list[QueryEvent]:
        """The events (unique query ids) with no call started for that very event."""
        return [
            e
            for e in events
            if (pending := self._started.get(e.query_id)) is None or pending.event != e
        ]

    def _start(self, events: list[QueryEvent], skip_decided: bool) -> None:
        # embedding starts now on a worker thread, and the calls follow on the loop. Started
        # from the loop, it waited for the loop, busy sending the batch before's calls, with the
        # embedder idle meanwhile (up to ~60 ms a batch, benchmarks/pipeline_throughput (a))
        chosen = self._worker.submit(self._embed_and_choose, events, skip_decided)
        job = asyncio.run_coroutine_threadsafe(self._call_chosen(events, chosen), self._loop)
        for row, event in enumerate(events):
            self._started.pop(event.query_id, None)
            self._started[event.query_id] = _Pending(event, job, row)
        while len(self._started) > MAX_QUERIES_KEPT:  # bounded: oldest first
            self._started.pop(next(iter(self._started)))

    def _calls(self, events: list[QueryEvent]) -> list[Called]:
        """The call of each event (unique query ids, none decided): the one started ahead or
        by an earlier attempt at this batch, else one made now. A call started ahead that
        could not be made (it failed, or found the query decided then) is made again now; a
        call made now that fails fails the batch (its events are then retried one by one)."""
        called: dict[str, Called] = {}
        for attempt in ("started", "now"):
            todo = [e for e in events if e.query_id not in called]
            fresh = self._not_started(todo) if attempt == "started" else todo
            if fresh:
                self._start(fresh, skip_decided=False)
            for event in todo:
                pending = self._started.get(event.query_id)
                call = pending.result() if pending is not None else None
                if isinstance(call, Called):
                    called[event.query_id] = call
                elif isinstance(call, BaseException) and (attempt == "now" or event in fresh):
                    raise call
                elif call is not None:
                    log.warning(
                        "calling ahead for %s failed (%s); calling now", event.query_id, call
                    )
        missing = [e.query_id for e in events if e.query_id not in called]
        if missing:  # not possible unless the calls made now were evicted at once
            raise RuntimeError(f"no call for {len(missing)} queries (batch too large?)")
        return [called[e.query_id] for e in events]

    async def _call_chosen(
        self,
        events: list[QueryEvent],
        embedded: Future[list[tuple[int, Choice, np.ndarray, str, CallRequest]]],
    ) -> list[Called | BaseException | None]:
        """Call the arm chosen for each event, once the worker has embedded and chosen."""
        chosen = await asyncio.wrap_future(embedded)
        results = await asyncio.gather(  # one call raising (a bug) must not lose the others
            *(self.gateway.call(choice.arm, request) for _, choice, _, _, request in chosen),
            return_exceptions=True,
        )
        self.llm_calls += len(results)
        out: list[Called | BaseException | None] = [None] * len(events)
        for (row, choice, context, layout, request), result in zip(chosen, results, strict=True):
            out[row] = (
                result
                if isinstance(result, BaseException)
                else Called(choice, context, layout, request, result)
            )
        return out

    def _embed_and_choose(
        self, events: list[QueryEvent], skip_decided: bool
    ) -> list[tuple[int, Choice, np.ndarray, str, CallRequest]]:
        """(row, choice, context, its layout, request) of each event to call for (on the
        worker thread)."""
        rows = list(range(len(events)))
        if skip_decided:
            with self.engine.connect() as conn:
                done = storage.existing_query_ids(conn, [e.query_id for e in events])
            rows = [i for i in rows if events[i].query_id not in done]
        if not rows:
            return []
        embeddings = self.vectors.embed([events[i].text for i in rows])
        arms = self.gateway.available_arms()
        queries = [(events[i].task, events[i].text, events[i].metadata) for i in rows]
        with self.live.lock:  # the builder's statistics move as decisions are stored
            contexts = self.live.context.build_many(queries, embeddings)
            layout = self.live.context.spec
            choices = self.live.policy.choose_many(arms, contexts.astype(np.float64))
        chosen = []
        for i, choice, context in zip(rows, choices, contexts, strict=True):
            event = events[i]
            task = self.config.tasks[event.task]
            prompt = build_prompt(task, event.text, event.options or task.labels)
            chosen.append((i, choice, context, layout, CallRequest(event.query_id, prompt)))
        return chosen

    def stored_events(self, query_ids: list[str]) -> list[DecisionEvent]:
        """The decision events of queries already decided, from Postgres (to publish again
        when their query is redelivered: the first publication may have been lost)."""
        if not query_ids:
            return []
        with self.engine.connect() as conn:
            rows = storage.decisions_by_id(conn, query_ids)
        return [self._event(row) for row in rows]

    def _row(self, record: QueryRecord, call: Called) -> dict[str, Any]:
        choice, result = call.choice, call.result
        event = record.event
        return {
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
        """Let calls still in flight finish (within ``CLOSE_TIMEOUT_S`` in all), then close the
        HTTP clients (they live on the calls' loop) and stop the threads."""
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        jobs = {id(p.job): p.job for p in self._started.values()}
        for job in jobs.values():
            try:
                job.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: S112 - their queries are decided again after a restart
                job.cancel()
        self._started.clear()
        self._worker.shutdown(wait=True, cancel_futures=True)
        try:
            asyncio.run_coroutine_threadsafe(self.gateway.aclose(), self._loop).result(30)
        except Exception:
            log.warning("closing the LLM clients failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(30)
        if not self._loop.is_running():
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
        started = time.monotonic()
        with self.engine.begin() as conn:
            storage.lock_learning_log(conn)  # see storage.lock_learning_log: the join is safe
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
            stats.rewards = store_labels(conn, scored)
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
