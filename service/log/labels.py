"""The labels' SQL: reading what a batch of labels is joined to, applying the plan
(:func:`service.log.join.join_labels`), and the labels waiting for their decision
(``pending_labels``). The writes need :func:`service.log.transaction.lock_learning_log`.

Invariant: exactly once per label. A decision is rewarded at most once (the UPDATE of
:func:`store_labels` takes only a decision without label and reward), and at least once once
it exists: an early label waits in ``pending_labels`` and is taken by the transaction that
stores its decision (:func:`service.log.decisions.store_decisions`; both under the log's lock,
so neither misses the other). Each different early label of a query waits in a row of its own
(the first may be rejected when its decision arrives); a copy of one is counted on its row.
A label event's effect is recorded with its offset (``label_offsets``, :func:`apply_plan`) in
the same transaction, so a redelivered label changes nothing. A label outside its decision's
label set is rejected (dead-lettered by the consumer when its decision is there; recorded in
``rejected_labels`` with its Kafka place when it waited for it:
:func:`service.log.decisions.store_decisions`), never applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from service.log.join import LabelPlan
from service.log.rows import (
    AppliedReward,
    ExpiredLabel,
    FoundDecision,
    PendingLabel,
    RejectedLabel,
    ScoredLabel,
    Source,
)
from service.storage import arrays, decisions, label_offsets, one_of, pending_labels
from service.storage import rejected_labels as rejected_table
from service.storage import service_counters as counters_table


@dataclass(frozen=True)
class LabelStats:
    """What a batch of labels did: labels scored (``applied``, with the ``rewards`` stored),
    duplicates counted on decisions, labels kept waiting and their duplicates, and labels
    ``redelivered`` by Kafka whose effect was stored before (no effect this time), and the
    labels ``rejected`` (outside their decision's label set) by their index in the batch."""

    applied: int
    duplicates: int
    pending: int
    pending_duplicates: int
    redelivered: int
    rewards: list[AppliedReward]
    rejected: list[tuple[int, RejectedLabel]] = field(default_factory=list)


def decisions_for_labels(conn: Connection, query_ids: Iterable[str]) -> dict[str, FoundDecision]:
    """The decisions these labels are for (what scoring needs), by id, locked until commit."""
    ids = sorted(set(query_ids))
    if not ids:
        return {}
    rows = conn.execute(
        sa.select(
            decisions.c.query_id,
            decisions.c.arm,
            decisions.c.prediction,
            decisions.c.status,
            decisions.c.cost_usd,
            decisions.c.context,
            decisions.c.context_layout,
            decisions.c.label,
            decisions.c.reward_seq,
            decisions.c.decided_at,
            decisions.c.options,
            decisions.c.task,
            decisions.c.raw_output,
            decisions.c.score,
            decisions.c.propensity,
            decisions.c.decision_lambda,
        )
        .where(one_of(decisions.c.query_id, ids))
        .order_by(decisions.c.query_id)
        .with_for_update()
    )
    return {
        r.query_id: FoundDecision(
            *r[:10],
            tuple(r.options) if r.options else None,
            r.task,
            r.raw_output,
            r.score,
            r.propensity,
            r.decision_lambda,
        )
        for r in rows
    }


def redelivered(conn: Connection, group: str, sources: Sequence[Source]) -> list[bool]:
    """Per label event (by its ``sources`` entry), whether ``group`` applied it before."""
    done = applied_label_offsets(conn, group, {(t, p) for t, p, _ in sources})
    return [o < done.get((t, p), 0) for t, p, o in sources]


def apply_plan(
    conn: Connection, plan: LabelPlan, group: str = "", sources: Sequence[Source] | None = None
) -> LabelStats:
    """Write a plan: keep the early labels, count the duplicates, store the scored labels with
    their rewards, and record the progress of ``group`` over ``sources``."""
    add_pending_labels(conn, plan.pending)
    count_waiting_duplicates(conn, plan.waiting_duplicates)
    pending_duplicates = sum(p.duplicates for p in plan.pending)
    pending_duplicates += sum(plan.waiting_duplicates.values())
    count_duplicate_labels(conn, plan.duplicates)
    rewards = store_labels(conn, plan.scored)
    if len(plan.rejected) > plan.rejected_again:
        bump_counter(conn, "labels_rejected", len(plan.rejected) - plan.rejected_again)
    if plan.duplicate_count + pending_duplicates:
        bump_counter(conn, "duplicate_labels", plan.duplicate_count + pending_duplicates)
    if sources:
        after: dict[tuple[str, int], int] = {}
        for topic, partition, offset in sources:
            after[topic, partition] = max(after.get((topic, partition), 0), offset + 1)
        record_label_offsets(conn, group, after)
    return LabelStats(
        plan.applied,
        plan.duplicate_count,
        len(plan.pending),
        pending_duplicates,
        plan.redelivered,
        rewards,
        plan.rejected,
    )


def _label_columns(rows: Sequence[ScoredLabel]) -> dict[str, tuple[sa.types.TypeEngine, list]]:
    return {
        "query_id": (sa.Text(), [r.query_id for r in rows]),
        "label": (sa.Text(), [r.label for r in rows]),
        "labeled_at": (sa.DateTime(timezone=True), [r.labeled_at for r in rows]),
        "correct": (sa.Boolean(), [r.correct for r in rows]),
        "score": (sa.Float(), [r.score for r in rows]),
        "dupes": (sa.Integer(), [r.extra_duplicates for r in rows]),
    }


def store_labels(conn: Connection, scored: Sequence[ScoredLabel]) -> list[AppliedReward]:
    """Store feedback (labels, scores) on their decisions, one statement for all: feedback with
    a reward gets the next reward sequence number (a decision is rewarded at most once, its
    first feedback wins); one without gets only its feedback. Returns the rewards stored."""
    seqs: dict[str, int] = {}
    rewarded = [r for r in scored if r.reward is not None]
    if rewarded:
        values, params = arrays(
            **_label_columns(rewarded),
            reward=(sa.Float(), [r.reward for r in rewarded]),
            lam=(sa.Float(), [r.lam for r in rewarded]),
        )
        result = conn.execute(
            sa.text(
                "UPDATE decisions AS d SET label = v.label, labeled_at = v.labeled_at, "
                "correct = v.correct, score = v.score, reward = v.reward, reward_lambda = v.lam, "
                "reward_applied_at = now(), reward_seq = nextval('reward_seq'), "
                "duplicate_labels = d.duplicate_labels + v.dupes "
                f"FROM {values} WHERE d.query_id = v.query_id "
                # label and reward_seq both NULL, written so that no index can serve it: as
                # `reward_seq IS NULL` the planner may take every unrewarded decision from
                # the reward_seq index (guessed at 0.5 % of the table) and compare each with
                # every label (nested loop, join filter): 0.15 s a batch of 64 on 5,000
                # decisions, 0.5-1 s a batch of 1,000 on 20,000. Each label's decision is
                # found by primary key instead.
                "AND num_nulls(d.label, d.score, d.reward_seq) = 3 "
                "RETURNING d.query_id, d.reward_seq"
            ),
            params,
        )
        seqs.update((q, int(seq)) for q, seq in result)
    label_only = [r for r in scored if r.reward is None]
    if label_only:
        values, params = arrays(**_label_columns(label_only))
        conn.execute(
            sa.text(
                "UPDATE decisions AS d SET label = v.label, labeled_at = v.labeled_at, "
                "correct = v.correct, score = v.score, "
                "duplicate_labels = d.duplicate_labels + v.dupes "
                f"FROM {values} WHERE d.query_id = v.query_id "
                "AND d.label IS NULL AND d.score IS NULL"
            ),
            params,
        )
    return [
        r.decision.reward(seqs[r.query_id], r.reward, r.correct, r.score)
        for r in rewarded
        if r.query_id in seqs and r.reward is not None
    ]


def count_duplicate_labels(conn: Connection, counts: dict[str, int]) -> None:
    """Add to the duplicate-label count of decisions already labeled."""
    if not counts:
        return
    values, params = arrays(
        query_id=(sa.Text(), list(counts)), n=(sa.Integer(), list(counts.values()))
    )
    conn.execute(
        sa.text(
            "UPDATE decisions AS d SET duplicate_labels = d.duplicate_labels + v.n "
            f"FROM {values} WHERE d.query_id = v.query_id"
        ),
        params,
    )


def add_pending_labels(conn: Connection, labels: Sequence[PendingLabel]) -> None:
    """Keep labels whose decision does not exist yet, each in a row of its own (in the
    order given: arrival order), with the copies of it counted so far. Which label of a
    query is new and which a copy is the join's to say (:func:`service.log.join.join_labels`,
    from :func:`waiting_labels`), under the learning log's lock."""
    if not labels:
        return
    values, params = arrays(
        query_id=(sa.Text(), [p.query_id for p in labels]),
        label=(sa.Text(), [p.label for p in labels]),
        score=(sa.Float(), [p.score for p in labels]),
        labeled_at=(sa.DateTime(timezone=True), [p.labeled_at for p in labels]),
        dupes=(sa.Integer(), [p.duplicates for p in labels]),
        **_source_columns([p.source for p in labels]),
        pos=(sa.Integer(), list(range(len(labels)))),
    )
    conn.execute(
        sa.text(  # inserted in order, so that their ids (from a sequence) are in arrival order
            "INSERT INTO pending_labels "
            "(query_id, label, score, labeled_at, duplicates, topic, partition, kafka_offset) "
            "SELECT v.query_id, v.label, v.score, v.labeled_at, v.dupes, v.topic, v.part, "
            f"v.kafka_offset FROM {values} ORDER BY v.pos"
        ),
        params,
    )


def count_waiting_duplicates(conn: Connection, counts: dict[int, int]) -> None:
    """Add to the duplicates of labels waiting for their decision (by row id)."""
    if not counts:
        return
    values, params = arrays(
        id=(sa.BigInteger(), list(counts)), n=(sa.Integer(), list(counts.values()))
    )
    conn.execute(
        sa.text(
            "UPDATE pending_labels AS p SET duplicates = p.duplicates + v.n "
            f"FROM {values} WHERE p.id = v.id"
        ),
        params,
    )


def _source_columns(
    sources: Sequence[Source | None],
) -> dict[str, tuple[sa.types.TypeEngine, list]]:
    return {
        "topic": (sa.Text(), [s.topic if s else None for s in sources]),
        "part": (sa.Integer(), [s.partition if s else None for s in sources]),
        "kafka_offset": (sa.BigInteger(), [s.offset if s else None for s in sources]),
    }


def record_rejected_labels(conn: Connection, rejected: Sequence[RejectedLabel]) -> None:
    """Record labels that waited for their decision and were then found outside its label
    set, with the reason and where they came from; counted as ``labels_rejected``."""
    if not rejected:
        return
    conn.execute(
        sa.insert(rejected_table),
        [
            {
                "query_id": r.query_id,
                "label": r.label,
                "reason": r.reason,
                "topic": r.source.topic if r.source else None,
                "partition": r.source.partition if r.source else None,
                "kafka_offset": r.source.offset if r.source else None,
            }
            for r in rejected
        ],
    )
    bump_counter(conn, "labels_rejected", len(rejected))


def add_pending_label(
    conn: Connection, query_id: str, label: str, labeled_at: datetime | None
) -> None:
    """Keep one label whose decision does not exist yet (see :func:`add_pending_labels`)."""
    add_pending_labels(conn, [PendingLabel(query_id, label, labeled_at)])


def take_pending_labels(conn: Connection, query_ids: Iterable[str]) -> list[PendingLabel]:
    """Delete and return the labels waiting for these queries, in arrival order."""
    ids = list(query_ids)
    if not ids:
        return []
    stmt = sa.delete(pending_labels).where(one_of(pending_labels.c.query_id, ids))
    return sorted(_pending(conn.execute(stmt.returning(*_PENDING))), key=lambda p: p.id or 0)


def waiting_labels(conn: Connection, query_ids: Iterable[str]) -> dict[str, list[PendingLabel]]:
    """The labels waiting for these queries' decisions, by query id, in arrival order."""
    ids = list(set(query_ids))
    if not ids:
        return {}
    stmt = (
        sa.select(*_PENDING)
        .where(one_of(pending_labels.c.query_id, ids))
        .order_by(pending_labels.c.id)
    )
    found: dict[str, list[PendingLabel]] = {}
    for p in _pending(conn.execute(stmt)):
        found.setdefault(p.query_id, []).append(p)
    return found


_PENDING = (
    pending_labels.c.query_id,
    pending_labels.c.label,
    pending_labels.c.labeled_at,
    pending_labels.c.duplicates,
    pending_labels.c.topic,
    pending_labels.c.partition,
    pending_labels.c.kafka_offset,
    pending_labels.c.score,
    pending_labels.c.id,
)


def _pending(rows: Iterable[sa.Row]) -> list[PendingLabel]:
    return [
        PendingLabel(
            r.query_id,
            r.label,
            r.labeled_at,
            r.duplicates,
            None if r.topic is None else Source(r.topic, r.partition, r.kafka_offset),
            r.score,
            r.id,
        )
        for r in rows
    ]


def count_pending_labels(conn: Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(pending_labels)).scalar_one())


def expire_pending_labels(conn: Connection, ttl_seconds: float) -> list[ExpiredLabel]:
    """Drop labels that waited longer than the TTL for a decision; returns what was dropped."""
    stmt = (
        sa.delete(pending_labels)
        .where(
            pending_labels.c.received_at
            < sa.func.now()
            - sa.func.make_interval(
                0, 0, 0, 0, 0, 0, sa.bindparam("ttl", ttl_seconds, type_=sa.Float)
            )
        )
        .returning(pending_labels.c.query_id, pending_labels.c.label, pending_labels.c.received_at)
    )
    return [ExpiredLabel(*r) for r in conn.execute(stmt)]


def applied_label_offsets(
    conn: Connection, group: str, partitions: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """The next offset not yet applied, per (topic, partition) of this consumer group; the rows
    stay locked until the transaction ends (one batch of a partition is applied at a time)."""
    wanted = set(partitions)
    if not wanted:
        return {}
    rows = conn.execute(
        sa.select(label_offsets.c.topic, label_offsets.c.partition, label_offsets.c.next_offset)
        .where(
            label_offsets.c.consumer_group == group,
            label_offsets.c.topic.in_(sorted({t for t, _ in wanted})),
        )
        .with_for_update()
    )
    return {
        (r.topic, r.partition): int(r.next_offset) for r in rows if (r.topic, r.partition) in wanted
    }


def record_label_offsets(conn: Connection, group: str, after: dict[tuple[str, int], int]) -> None:
    """Record that every label before ``after[(topic, partition)]`` has been applied."""
    if not after:
        return
    values, params = arrays(
        topic=(sa.Text(), [t for t, _ in after]),
        part=(sa.Integer(), [p for _, p in after]),
        next_offset=(sa.BigInteger(), list(after.values())),
    )
    conn.execute(
        sa.text(
            "INSERT INTO label_offsets (consumer_group, topic, partition, next_offset) "
            f"SELECT :group, v.topic, v.part, v.next_offset FROM {values} "
            "ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET "
            "next_offset = greatest(label_offsets.next_offset, excluded.next_offset), "
            "updated_at = now()"
        ),
        {**params, "group": group},
    )


def bump_counter(conn: Connection, name: str, by: int = 1) -> None:
    stmt = postgresql.insert(counters_table).values(name=name, value=by)
    stmt = stmt.on_conflict_do_update(
        index_elements=["name"], set_={"value": counters_table.c.value + by}
    )
    conn.execute(stmt)
