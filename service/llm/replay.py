"""An arm that answers from an outcomes file: what that model really answered, at its real cost.

Useful for evaluation and for running the service against recorded traffic without any model.
"""

from __future__ import annotations

import json
from pathlib import Path

from service.llm.base import CallRequest, Completion, LLMError


class ReplayProvider:
    def __init__(self, outcomes_path: Path, arm: str) -> None:
        self.arm = arm
        self._answers: dict[str, tuple[str | None, float, int, int]] = {}
        with open(outcomes_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    outcome = record["arms"][arm]
                    self._answers[record["query_id"]] = (
                        outcome["prediction"],
                        float(outcome["cost_usd"]),
                        int(outcome.get("input_tokens") or 0),
                        int(outcome.get("output_tokens") or 0),
                    )
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(
                        f"{outcomes_path}:{lineno}: no outcome for arm {arm!r} ({exc!r})"
                    ) from None

    async def complete(self, request: CallRequest) -> Completion:
        try:
            prediction, cost, tokens_in, tokens_out = self._answers[request.query_id]
        except KeyError:
            raise LLMError(f"query {request.query_id!r} is not in the outcomes file") from None
        if prediction is None:
            raise LLMError("the recorded call failed")
        return Completion(prediction, tokens_in, tokens_out, cost_usd=cost)

    def close(self) -> None:
        pass
