"""Joining a batch of labels to their decisions: a pure function from what the database holds
to what to write (:func:`join_labels`); :mod:`service.log.labels` reads the inputs and applies
the plan, in one transaction under the learning log's lock.

The rules: the first label of a query wins, and the others count as its duplicates; a label
whose decision is not stored yet (*early*) waits for it; one whose decision is stored (*late*)
is scored against it; one whose decision already has a label is a duplicate; a label unlike the
one kept is a conflict (logged, ignored); a label *redelivered* by Kafka whose effect is already
stored changes nothing. A label outside its decision's label set (the task's labels, or the
query's ``options``; compared as predictions are, ignoring case and surrounding space) is
*rejected*: never applied, never the first label; an early one is checked when its decision
arrives (:func:`check_early_labels`). So is a label for an open task without a check (only a
score can grade its answer). A ``score`` (in [0, 1]) is feedback like a label: the first
feedback of a query wins, whichever kind; a score is never outside a label set.

Since an early label may be rejected when its decision arrives, an early label unlike those
waiting for the same query waits beside them (each in arrival order); only a copy of one
waiting is counted as its duplicate. When the decision arrives, the first of them that is not
rejected wins and the later ones are its duplicates.

    >>> from service.events import LabelEvent
    >>> settings = RewardSettings(lam=0.1, cost_unit=0.001)
    >>> def plan(labels, found=(), waiting=(), redelivered=None):
    ...     found = {d.query_id: d for d in found}
    ...     again = redelivered or [False] * len(labels)
    ...     waiting = {q: [PendingLabel(q, "a", None, id=1)] for q in waiting}
    ...     return join_labels(labels, found, waiting, again, settings)

An early label waits; a late one is scored:

    >>> [(p.query_id, p.label) for p in plan([LabelEvent(query_id="q9", label="a")]).pending]
    [('q9', 'a')]
    >>> late = plan([LabelEvent(query_id="q1", label="positive")], [FoundDecision.example()])
    >>> [(s.query_id, s.correct, s.reward) for s in late.scored], late.applied
    ([('q1', True, 0.99)], 1)

A second label for a query is a duplicate (and a conflict when it differs); so is a label for
a decision labeled before:

    >>> twice = plan([LabelEvent(query_id="q1", label="positive"),
    ...               LabelEvent(query_id="q1", label="negative")], [FoundDecision.example()])
    >>> twice.duplicate_count, twice.scored[0].label, twice.conflicts
    (1, 'positive', [Conflict(query_id='q1', kept='positive', ignored='negative')])
    >>> labeled = FoundDecision.example(label="positive", reward_seq=4)
    >>> again = plan([LabelEvent(query_id="q1", label="positive")], [labeled])
    >>> again.duplicates, again.scored
    ({'q1': 1}, [])

A redelivered label whose effect is stored (its decision labeled, or it waits already)
changes nothing; one whose effect is not there is applied as if new:

    >>> redone = plan([LabelEvent(query_id="q1", label="positive"),
    ...                LabelEvent(query_id="q9", label="a"), LabelEvent(query_id="q8", label="b")],
    ...               [labeled], waiting=["q9"], redelivered=[True, True, True])
    >>> redone.redelivered, redone.duplicates, [p.query_id for p in redone.pending]
    (2, {}, ['q8'])

Two different early labels both wait (either may be rejected); a copy of one waiting is
its duplicate:

    >>> both = plan([LabelEvent(query_id="q1", label="banana"),
    ...              LabelEvent(query_id="q1", label="positive"),
    ...              LabelEvent(query_id="q9", label="A ")], waiting=["q9"])
    >>> [p.label for p in both.pending], both.waiting_duplicates, both.conflicts
    (['banana', 'positive'], {1: 1}, [])

When the decision arrives, the rejected one is recorded and the good one is scored:

    >>> early = check_early_labels(both.pending[:2], {"q1": FoundDecision.example()})
    >>> [p.label for p in early.kept], [r.label for r in early.rejected], early.duplicates
    (['positive'], ['banana'], 0)

A label outside the decision's label set is rejected, and a good one after it is scored:

    >>> bad = plan([LabelEvent(query_id="q1", label="banana"),
    ...             LabelEvent(query_id="q1", label="negative")], [FoundDecision.example()])
    >>> [(i, r.reason) for i, r in bad.rejected]
    [(0, "label 'banana' is not one of the query's labels: positive, negative")]
    >>> [(s.label, s.correct) for s in bad.scored]
    [('negative', False)]

A score is scored as given; a later label for the same query is a conflicting duplicate:

    >>> graded = plan([LabelEvent(query_id="q1", score=0.5),
    ...                LabelEvent(query_id="q1", label="positive")], [FoundDecision.example()])
    >>> [(s.score, s.reward) for s in graded.scored], graded.conflicts
    ([(0.5, 0.49)], [Conflict(query_id='q1', kept='score 0.5', ignored='positive')])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from service.events import LabelEvent
from service.log.rows import FoundDecision, PendingLabel, RejectedLabel, ScoredLabel, Source
from service.reward import RewardSettings, labels_match, score_label, unscorable_label


@dataclass(frozen=True)
class Conflict:
    """A label unlike the one kept for its query (ignored)."""

    query_id: str
    kept: str
    ignored: str


@dataclass
class LabelPlan:
    """What a batch of labels writes: labels to keep until their decision, duplicates to count
    on decisions labeled before, labels scored against their decisions."""

    pending: list[PendingLabel] = field(default_factory=list)
    #: copies of labels already waiting (by their row id in pending_labels): how many more
    waiting_duplicates: dict[int, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)  # by query id: labeled before
    scored: list[ScoredLabel] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    redelivered: int = 0  # applied before (Kafka redelivered them): no effect this time
    #: labels outside their decision's label set, by their index in the batch (a redelivered
    #: one is dead-lettered again, its first may not have reached the broker, but not counted)
    rejected: list[tuple[int, RejectedLabel]] = field(default_factory=list)
    rejected_again: int = 0

    @property
    def applied(self) -> int:
        return len(self.scored)

    @property
    def duplicate_count(self) -> int:
        """Duplicates of labels on decisions (those of pending labels are counted on writing)."""
        return sum(self.duplicates.values()) + sum(s.extra_duplicates for s in self.scored)


def feedback_text(label: str | None, score: float | None) -> str:
    """A feedback as logged: the label, or ``score x``."""
    return label if label is not None else f"score {score:g}"


def feedback_of(event: LabelEvent) -> tuple[str | None, float | None]:
    """A label event's feedback: (label, score), one of them None."""
    return event.label, event.score


def same_feedback(a: tuple[str | None, float | None], b: tuple[str | None, float | None]) -> bool:
    """Whether two feedbacks (label, score) say the same (labels compared as predictions)."""
    if a[0] is not None and b[0] is not None:
        return labels_match(a[0], b[0])
    return a[0] is None and b[0] is None and a[1] == b[1]


def rejected_label(
    decision: FoundDecision, label: str | None, settings: RewardSettings | None
) -> str | None:
    """Why the feedback ``label`` (None: a score) cannot be its decision's (None: it can):
    outside the label set, or for an open task without a check."""
    if label is None:
        return None
    return outside_label_set(decision, label) or (
        None if settings is None else unscorable_label(decision, settings)
    )


def outside_label_set(decision: FoundDecision, label: str) -> str | None:
    """Why ``label`` cannot be its decision's label (None: it can).

    >>> outside_label_set(FoundDecision.example(), " Positive ") is None
    True
    """
    if decision.options is None or any(labels_match(o, label) for o in decision.options):
        return None
    return f"label {label!r} is not one of the query's labels: {', '.join(decision.options)}"


@dataclass(frozen=True)
class EarlyLabels:
    """The labels that waited for their decisions, checked against them: those ``kept`` (one
    a query, to score it, carrying the later ones as its duplicates), those ``rejected``, the
    ``conflicts`` between the one kept and the later ones, and how many of those later ones
    became ``duplicates`` now (copies of a waiting label were counted when they came)."""

    kept: list[PendingLabel]
    rejected: list[RejectedLabel]
    conflicts: list[Conflict]
    duplicates: int


def check_early_labels(
    early: Sequence[PendingLabel],
    found: Mapping[str, FoundDecision],
    settings: RewardSettings | None = None,
) -> EarlyLabels:
    """Check the labels that waited for their decisions (now ``found``), in arrival order: a
    label outside its decision's label set is rejected (:func:`rejected_label`); the first
    other one of a query is kept, and those after it are its duplicates.

    >>> checked = check_early_labels(
    ...     [PendingLabel("q1", "banana", None), PendingLabel("q1", "negative", None),
    ...      PendingLabel("q1", None, None, duplicates=2, score=0.5)],
    ...     {"q1": FoundDecision.example()})
    >>> [(p.label, p.duplicates) for p in checked.kept], [r.label for r in checked.rejected]
    ([('negative', 3)], ['banana'])
    >>> checked.conflicts, checked.duplicates
    ([Conflict(query_id='q1', kept='negative', ignored='score 0.5')], 1)
    """
    kept: dict[str, PendingLabel] = {}
    rejected, conflicts, duplicates = [], [], 0
    for p in early:
        reason = rejected_label(found[p.query_id], p.label, settings)
        first = kept.get(p.query_id)
        if reason is not None and p.label is not None:
            rejected.append(RejectedLabel(p.query_id, p.label, reason, p.source))
        elif first is None:
            kept[p.query_id] = p
        else:
            duplicates += 1
            kept[p.query_id] = replace(first, duplicates=first.duplicates + 1 + p.duplicates)
            conflicts.append(
                Conflict(
                    p.query_id,
                    feedback_text(first.label, first.score),
                    feedback_text(p.label, p.score),
                )
            )
    return EarlyLabels(list(kept.values()), rejected, conflicts, duplicates)


def wait_for_decision(
    plan: LabelPlan,
    indexed: Sequence[tuple[int, LabelEvent]],
    waiting: Sequence[PendingLabel],
    sources: Sequence[Source] | None,
) -> None:
    """Plan the early labels of one query (``indexed`` by their place in the batch), given
    those ``waiting`` for it already: a copy of a label waiting (or earlier in the batch) is
    its duplicate; any other waits beside them, as any of them may be rejected later."""
    rows = list(waiting)
    for i, event in indexed:
        same = next(
            (
                k
                for k, p in enumerate(rows)
                if same_feedback((p.label, p.score), feedback_of(event))
            ),
            None,
        )
        if same is None:
            source = sources[i] if sources else None
            rows.append(
                PendingLabel(event.query_id, event.label, event.labeled_at, 0, source, event.score)
            )
        else:
            rows[same] = replace(rows[same], duplicates=rows[same].duplicates + 1)
    for before, after in zip(waiting, rows, strict=False):
        if after.duplicates > before.duplicates and before.id is not None:
            plan.waiting_duplicates[before.id] = after.duplicates - before.duplicates
    plan.pending += rows[len(waiting) :]


def join_labels(
    labels: Sequence[LabelEvent],
    found: Mapping[str, FoundDecision],
    waiting: Mapping[str, Sequence[PendingLabel]],
    redelivered: Sequence[bool],
    settings: RewardSettings,
    sources: Sequence[Source] | None = None,
) -> LabelPlan:
    """The plan for ``labels`` given their stored decisions (``found``, by query id), the
    labels ``waiting`` for the others (by query id, in arrival order), which labels were
    ``redelivered`` (applied before, by their Kafka offsets), and their ``sources`` if known
    (kept with an early label)."""
    plan = LabelPlan()
    by_query: dict[str, list[tuple[int, LabelEvent]]] = {}
    for i, (event, again) in enumerate(zip(labels, redelivered, strict=True)):
        decision = found.get(event.query_id)
        source = sources[i] if sources else None
        reason = None if decision is None else rejected_label(decision, event.label, settings)
        if reason is not None and event.label is not None:
            plan.rejected.append((i, RejectedLabel(event.query_id, event.label, reason, source)))
            plan.rejected_again += again
            continue
        if again and (event.query_id in waiting if decision is None else decision.labeled):
            plan.redelivered += 1  # its effect is already there
            continue
        by_query.setdefault(event.query_id, []).append((i, event))
    for qid, indexed in by_query.items():
        decision = found.get(qid)
        if decision is None:
            wait_for_decision(plan, indexed, waiting.get(qid, ()), sources)
            continue
        first, *rest = [event for _, event in indexed]
        kept = (decision.label, decision.score) if decision.labeled else feedback_of(first)
        for event in [first, *rest] if decision.labeled else rest:
            if not same_feedback(kept, feedback_of(event)):
                plan.conflicts.append(
                    Conflict(qid, feedback_text(*kept), feedback_text(*feedback_of(event)))
                )
        if decision.labeled:
            plan.duplicates[qid] = 1 + len(rest)
        else:
            plan.scored.append(
                score_label(
                    decision, first.label, first.labeled_at, settings, len(rest), first.score
                )
            )
    return plan
