"""Scoring: the routing reward of the MetaLLM paper, with real per-query cost, and how feedback
(a label, or a score) scores a decision.

>>> reward(correct=True, cost_usd=0.0005, lam=0.1, cost_unit=0.001)
0.95
>>> scored = score_label(FoundDecision.example(prediction="Positive"), " positive", None,
...                      RewardSettings(lam=0.1, cost_unit=0.001))
>>> scored.correct, scored.reward, scored.lam
(True, 0.99, 0.1)

A score in [0, 1] (a user's thumbs, a grader's mark) is the outcome itself, for any task:
``reward = score − λ·cost/cost_unit``; an open task's reference label is turned into a score
by the task's check (1 or 0):

>>> settings = RewardSettings(0.1, 0.001, {"chat": TaskScoring(True, AnswerCheck("contains"))})
>>> chat = FoundDecision.example(task="chat", prediction=None, answer="It is Paris.",
...                              options=None)
>>> s = score_label(chat, None, None, settings, score=0.5)
>>> s.score, s.correct, s.reward
(0.5, None, 0.49)
>>> s = score_label(chat, "paris", None, settings)
>>> s.score, s.correct, s.reward
(1.0, True, 0.99)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from service.log.rows import FoundDecision, ScoredLabel

if TYPE_CHECKING:
    from service.config import TaskConfig


def _norm(text: str, case_sensitive: bool) -> str:
    """Runs of white space as one space, the ends stripped, case folded unless sensitive."""
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


@dataclass(frozen=True)
class AnswerCheck:
    """How a reference label scores an open task's answer: 1.0 when it matches, else 0.0.
    Both are compared with runs of white space as one space, the ends stripped, and (unless
    ``case_sensitive``) ignoring case.

    - ``exact``: the whole answer is the label;
    - ``contains``: the label is in the answer;
    - ``regex``: ``pattern``'s last match in the answer (its first group, if it has groups)
      is the label; no match scores 0.

    >>> exact = AnswerCheck("exact")
    >>> exact.score(" Paris ", "paris"), exact.score("Paris.", "paris")
    (1.0, 0.0)
    >>> AnswerCheck("contains").score("The capital is  Paris.", "capital is paris")
    1.0
    >>> total = AnswerCheck("regex", r"answer is (-?\\d+)")
    >>> total.score("3+4: the answer is 6, no, the answer is 7", "7"), total.score("7", "7")
    (1.0, 0.0)
    >>> AnswerCheck("exact", case_sensitive=True).score("paris", "Paris")
    0.0
    """

    kind: str  # exact | contains | regex
    pattern: str | None = None
    case_sensitive: bool = False

    def score(self, answer: str | None, reference: str) -> float:
        if answer is None:
            return 0.0
        want = _norm(reference, self.case_sensitive)
        if self.kind == "exact":
            return float(_norm(answer, self.case_sensitive) == want)
        if self.kind == "contains":
            return float(want in _norm(answer, self.case_sensitive))
        if self.kind == "regex" and self.pattern is not None:
            flags = 0 if self.case_sensitive else re.IGNORECASE
            matches = list(re.finditer(self.pattern, answer, flags))
            if not matches:
                return 0.0
            last = matches[-1]
            found = last.group(1) if last.re.groups else last.group(0)
            return float(_norm(found or "", self.case_sensitive) == want)
        raise ValueError(f"unknown check {self.kind!r}")


@dataclass(frozen=True)
class TaskScoring:
    """How a task's feedback is scored: ``open`` (its answer is the model's text: a label is
    scored by ``check``, and without one it is rejected), else against its label set."""

    open: bool = False
    check: AnswerCheck | None = None


def task_scoring(tasks: Mapping[str, TaskConfig]) -> dict[str, TaskScoring]:
    """Each configured task's scoring, by name."""
    out = {}
    for name, task in tasks.items():
        check = task.check
        out[name] = TaskScoring(
            task.kind == "open",
            None if check is None else AnswerCheck(check.kind, check.pattern, check.case_sensitive),
        )
    return out


@dataclass(frozen=True)
class RewardSettings:
    """λ and the cost unit it applies per (λ may move in budget mode: see LivePolicy), and how
    each task's feedback is scored (a task not named: against its label set)."""

    lam: float
    cost_unit: float
    tasks: Mapping[str, TaskScoring] = field(default_factory=dict)

    def scoring(self, task: str) -> TaskScoring:
        return self.tasks.get(task) or TaskScoring()


def reward(correct: bool | float, cost_usd: float, lam: float, cost_unit: float) -> float:
    """r = outcome − λ · cost / cost_unit, the outcome 1[correct] or a score in [0, 1]. A failed
    or unparseable call counts as wrong."""
    if cost_unit <= 0:
        raise ValueError("cost_unit must be positive")
    outcome = float(correct)
    if not 0.0 <= outcome <= 1.0:
        raise ValueError(f"an outcome is in [0, 1], not {outcome}")
    return outcome - lam * cost_usd / cost_unit


def labels_match(prediction: str | None, label: str) -> bool:
    """A prediction is correct when it equals the label, ignoring case and surrounding space."""
    return prediction is not None and prediction.strip().casefold() == label.strip().casefold()


def failure_reward(settings: RewardSettings) -> float:
    """The reward of a call whose arm failed: wrong, at no cost (a failed request returns no
    usage)."""
    return reward(False, 0.0, settings.lam, settings.cost_unit)


def unscorable_label(decision: FoundDecision, settings: RewardSettings) -> str | None:
    """Why a label cannot score ``decision`` (None: it can): its task is open-ended and has
    no check to compare a reference label with its answer.

    >>> unscorable_label(FoundDecision.example(task="chat"),
    ...                  RewardSettings(0.1, 0.001, {"chat": TaskScoring(open=True)}))
    "task 'chat' is open-ended and has no check: send a score in [0, 1], not a label"
    """
    scoring = settings.scoring(decision.task)
    if scoring.open and scoring.check is None:
        return (
            f"task {decision.task!r} is open-ended and has no check: "
            "send a score in [0, 1], not a label"
        )
    return None


def _outcome(
    decision: FoundDecision, label: str | None, score: float | None, settings: RewardSettings
) -> tuple[bool | None, float | None]:
    """(correct, score) of a feedback: a score as given (``correct`` unknown); a label against
    an open task's answer by its check (correct when it scores 1); else against the
    prediction (a failed or unparseable call is wrong)."""
    if score is not None:
        return None, score
    assert label is not None
    scoring = settings.scoring(decision.task)
    if scoring.open and scoring.check is not None:
        answer = decision.answer if decision.status == "ok" else None
        value = scoring.check.score(answer, label)
        return value == 1.0, value
    return decision.status == "ok" and labels_match(decision.prediction, label), None


def score_label(
    decision: FoundDecision,
    label: str | None,
    labeled_at: datetime | None,
    settings: RewardSettings,
    duplicates: int = 0,
    score: float | None = None,
) -> ScoredLabel:
    """Score a decision against its feedback (a ``label``, or a ``score``). A failed or
    unparseable call is wrong (and still pays its cost). A decision rewarded at decision time
    (its arm failed) only gets its feedback: no second policy update; so does one whose arm
    refused the prompt as longer than its context window (``input_too_long``): that says
    nothing of the arm."""
    correct, value = _outcome(decision, label, score, settings)
    scored = ScoredLabel(
        decision, label, labeled_at, correct, extra_duplicates=duplicates, score=value
    )
    if decision.reward_seq is not None or decision.status == "input_too_long":
        return scored
    outcome = value if value is not None else bool(correct)
    r = reward(outcome, decision.cost_usd, settings.lam, settings.cost_unit)
    return ScoredLabel(decision, label, labeled_at, correct, r, settings.lam, duplicates, value)
