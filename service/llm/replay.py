"""An arm that answers from an outcomes file: what that model really answered, at its real cost.

Useful for evaluation and for running the service against recorded traffic without any model.
A call's ``max_tokens`` and ``temperature`` change nothing: the answer is the one recorded.
"""

from __future__ import annotations

from pathlib import Path

from service.llm.base import CallRequest, Completion, LLMError
from service.outcomes import ArmOutcome, iter_outcomes


class ReplayProvider:
    """Answers query ``q`` with what arm ``arm`` recorded for ``q`` in the outcomes file
    (read and validated by :mod:`service.outcomes`; a malformed line fails at start-up)."""

    def __init__(self, outcomes_path: Path, arm: str) -> None:
        self.arm = arm
        self._answers: dict[str, ArmOutcome] = {}
        for record in iter_outcomes(outcomes_path):
            if arm not in record.arms:
                raise ValueError(
                    f"{outcomes_path}: query {record.query_id!r} has no outcome for arm {arm!r}"
                )
            self._answers[record.query_id] = record.arms[arm]

    async def complete(self, request: CallRequest) -> Completion:
        try:
            outcome = self._answers[request.query_id]
        except KeyError:
            raise LLMError(f"query {request.query_id!r} is not in the outcomes file") from None
        if outcome.prediction is None:
            raise LLMError("the recorded call failed")
        return Completion(
            outcome.prediction,
            outcome.input_tokens or 0,
            outcome.output_tokens or 0,
            cost_usd=outcome.cost_usd,
        )

    def close(self) -> None:
        pass
