"""Option scoring: pick the answer a model finds most likely, instead of parsing free text.

Providers that expose log-probabilities compute one log-score per allowed answer; the answer
with the highest (optionally calibrated) score wins. Contextual calibration (Zhao et al., 2021,
"Calibrate Before Use") divides each answer's probability by its probability for a content-free
input ("N/A") under the same prompt, which removes the model's prior bias towards some labels;
in log space that is a subtraction.

>>> pick({"yes": -0.1, "no": -2.0})
'yes'
>>> pick({"yes": -0.1, "no": -2.0}, calibration={"yes": -0.05, "no": -3.0})
'no'
>>> pick({"yes": -1.0, "no": -1.0}) is None     # a tie is no answer
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def calibrated(
    scores: Mapping[str, float], calibration: Mapping[str, float] | None
) -> dict[str, float]:
    """log p(answer | input) − log p(answer | content-free input), per answer."""
    if calibration is None:
        return dict(scores)
    return {a: s - calibration[a] for a, s in scores.items()}


def pick(scores: Mapping[str, float], calibration: Mapping[str, float] | None = None) -> str | None:
    """The answer with the highest score; None when tied or when no answer has a finite score."""
    final = calibrated(scores, calibration)
    finite = {a: s for a, s in final.items() if math.isfinite(s)}
    if not finite:
        return None
    best = max(finite.values())
    winners = [a for a, s in finite.items() if s == best]
    return winners[0] if len(winners) == 1 else None


def first_token_scores(
    top_logprobs: Iterable[tuple[str, float]], answers: Iterable[str], floor: bool = False
) -> dict[str, float]:
    """Score answers by the first generated token's top log-probabilities (all that a chat API
    exposes). A token counts for an answer when, stripped and case-folded, it starts the answer;
    an answer's score is the log of the summed probability of its tokens (" positive" and
    " Positive" both say positive). Answers absent from the top list score −inf, or with
    ``floor`` the lowest listed log-prob (they are at most that likely; used for the calibration
    input). Answers that share their first token tie, and a tie is no answer.

    >>> s = first_token_scores([(" Positive", -1.0), (" positive", -1.0), ("neg", -1.5)],
    ...                        ["positive", "negative"])
    >>> round(s["positive"], 3), s["negative"]
    (-0.307, -1.5)
    """
    top = [(t.strip().casefold(), lp) for t, lp in top_logprobs]
    top = [(t, lp) for t, lp in top if t]
    missing = min((lp for _, lp in top), default=-math.inf) if floor else -math.inf
    scores = {}
    for answer in answers:
        target = " ".join(answer.casefold().split())
        matches = [lp for t, lp in top if target.startswith(t)]
        scores[answer] = _logsumexp(matches) if matches else missing
    return scores


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))
