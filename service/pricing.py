"""What each arm's call will cost, estimated before it is made: the price a priced choice pays.

A policy that ``learns_correctness`` (:mod:`service.policy.base`) chooses with
``Pricing(λ, cost_unit, est_cost)``; ``est_cost[arm]`` comes from here. A call costs its input
tokens times the arm's input price plus its output tokens times the output price. Before the
call, the input tokens are the prompt's characters / 4 and the output tokens the arm's running
mean of the output tokens its calls recorded (on the query's task once it has called that task:
an open task's answers are far longer than a label); an arm without prices in the config (or
whose calls never recorded tokens) is charged its running mean recorded cost instead
(:class:`~service.policy.base.RunningCosts`, fitted on the prompt's length).

:class:`CostEstimator` is a projection of the decision log: it observes each stored decision
once, in ``decision_seq`` order, like the context builder's statistics, and is checkpointed
beside them, so every instance prices a query the same way. A call whose arm failed tells
nothing of that arm's cost and is skipped (so is one it refused as too long).

    >>> prices = {"cheap": ArmPrice(0.1, 0.4), "strong": ArmPrice(2.0, 8.0), "free": None}
    >>> costs = CostEstimator()
    >>> costs.observe(1, "cheap", cost_usd=2e-6, n_chars=40, output_tokens=3)
    >>> costs.observe(2, "cheap", cost_usd=2e-6, n_chars=40, output_tokens=5)
    >>> costs.observe(3, "free", cost_usd=1e-5, n_chars=40, output_tokens=None)
    >>> est = costs.estimate(prices, n_chars=400)
    >>> round(est["cheap"] * 1e6, 4)    # (400/4 · 0.1 + 4 · 0.4) / 1e6
    11.6
    >>> round(est["strong"] * 1e6, 4)   # no call yet: its input only
    200.0
    >>> est["free"], costs.watermark
    (1e-05, 3)
    >>> CostEstimator.from_dict(costs.to_dict()).estimate(prices, 400) == est
    True

Per task: an arm's mean output tokens on the query's task, once it has called that task.

    >>> costs.observe(4, "cheap", cost_usd=9e-5, n_chars=40, output_tokens=200, task="chat")
    >>> round(costs.estimate(prices, 400, task="chat")["cheap"] * 1e6, 4)   # 100·0.1 + 200·0.4
    90.0
    >>> round(costs.estimate(prices, 400, task="other")["cheap"] * 1e6, 4)  # 69.33 tokens
    37.7333
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from service.policy.base import Pricing, RunningCosts
from service.query_checks import CHARS_PER_TOKEN


@dataclass(frozen=True)
class ArmPrice:
    """An arm's prices in USD per million tokens (``ArmConfig``'s)."""

    input_per_1m: float
    output_per_1m: float

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        """USD for these tokens.

        >>> ArmPrice(1.0, 2.0).cost(1e6, 0.5e6)
        2.0
        """
        return (input_tokens * self.input_per_1m + output_tokens * self.output_per_1m) / 1e6


def arm_prices(arms: Iterable[Any]) -> dict[str, ArmPrice | None]:
    """The prices of configured arms (``ArmConfig``), by name; None for an arm with none set.

    >>> from types import SimpleNamespace as A
    >>> arm_prices([A(name="a", input_price_per_1m=1.0, output_price_per_1m=0.0),
    ...             A(name="b", input_price_per_1m=0.0, output_price_per_1m=0.0)])
    {'a': ArmPrice(input_per_1m=1.0, output_per_1m=0.0), 'b': None}
    """
    out: dict[str, ArmPrice | None] = {}
    for arm in arms:
        price = ArmPrice(float(arm.input_price_per_1m), float(arm.output_price_per_1m))
        out[arm.name] = price if price.input_per_1m or price.output_per_1m else None
    return out


def priced_columns(arm: str, pricing: Pricing | None) -> dict[str, float | None]:
    """A decision's ``decision_lambda`` and ``estimated_cost_usd``: the λ its choice was
    priced at and the chosen arm's estimated cost (None for a choice not priced).

    >>> priced_columns("a", Pricing(0.2, 0.001, {"a": 1e-5}))
    {'decision_lambda': 0.2, 'estimated_cost_usd': 1e-05}
    >>> priced_columns("a", None)
    {'decision_lambda': None, 'estimated_cost_usd': None}
    """
    if pricing is None:
        return {"decision_lambda": None, "estimated_cost_usd": None}
    est = (pricing.est_cost or {}).get(arm)
    return {"decision_lambda": pricing.lam, "estimated_cost_usd": est}


class CostEstimator:
    """Each arm's output tokens and costs so far (a projection of the decision log), and the
    cost of a call estimated from them (module docstring)."""

    def __init__(self, halflife: float | None = None) -> None:
        self.halflife = halflife
        self.watermark = 0  # highest decision_seq observed
        self._tokens: dict[str, list[float]] = {}  # arm → [calls with tokens, Σ output tokens]
        self._task_tokens: dict[tuple[str, str], list[float]] = {}  # the same by (arm, task)
        # recorded costs, forgotten with the policy's half-life when it follows drift
        self._costs = RunningCosts(halflife)

    def observe(
        self,
        seq: int,
        arm: str,
        cost_usd: float,
        n_chars: int,
        output_tokens: int | None,
        cost_unknown: bool = False,
        task: str = "",
    ) -> None:
        """Observe the stored decision ``seq`` of ``task`` (once: a seq at or below the
        watermark is ignored)."""
        if seq <= self.watermark:
            return
        self.watermark = seq
        if cost_unknown or not arm:
            return
        self._costs.observe(arm, cost_usd, n_chars)
        if output_tokens is not None:
            for sums in (
                self._tokens.setdefault(arm, [0.0, 0.0]),
                self._task_tokens.setdefault((arm, task), [0.0, 0.0]),
            ):
                sums[0] += 1.0
                sums[1] += float(output_tokens)

    def mean_output_tokens(self) -> dict[str, float]:
        """Each arm's mean recorded output tokens (arms whose calls recorded some)."""
        return {arm: total / n for arm, (n, total) in self._tokens.items() if n}

    def estimate(
        self,
        prices: Mapping[str, ArmPrice | None],
        n_chars: int,
        prompt_chars: int | None = None,
        task: str | None = None,
    ) -> dict[str, float]:
        """The expected cost in USD of each arm's call on a query of ``task`` (None: any) of
        ``n_chars`` characters whose prompt has ``prompt_chars`` (None: ``n_chars``): priced
        arms by their tokens (their mean output tokens on the task, once they called it), the
        others by their recorded costs, fitted on the query's length (an arm with neither is
        left out: a priced choice charges it nothing)."""
        recorded = self._costs.estimate(n_chars)
        prompt = n_chars if prompt_chars is None else prompt_chars
        outputs = self.mean_output_tokens()
        if task is not None:
            outputs.update(
                (arm, total / n)
                for (arm, of), (n, total) in self._task_tokens.items()
                if of == task and n
            )
        out: dict[str, float] = {}
        for arm in dict.fromkeys([*prices, *recorded]):
            price = prices.get(arm)
            if price is not None:
                out[arm] = price.cost(prompt / CHARS_PER_TOKEN, outputs.get(arm, 0.0))
            elif arm in recorded:
                out[arm] = recorded[arm]
        return out

    # ------------------------------------------------------------------ checkpoint
    def to_dict(self) -> dict[str, Any]:
        """JSON state (the checkpoint header's ``costs``)."""
        return {
            "watermark": self.watermark,
            "tokens": {a: list(v) for a, v in self._tokens.items()},
            "task_tokens": [[a, t, *v] for (a, t), v in self._task_tokens.items()],
            "costs": self._costs.to_dict(),
            "halflife": self.halflife,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], halflife: float | None = None) -> CostEstimator:
        """The state :meth:`to_dict` wrote. One that does not match — from before the per-task
        means, or forgetting with another ``halflife`` — is not kept: a fresh estimator,
        watermark 0, which the learning log rebuilds from the decisions.

        >>> CostEstimator.from_dict({"watermark": 9, "tokens": {}, "costs": {}}).watermark
        0
        >>> kept = CostEstimator(100.0).to_dict()
        >>> kept["watermark"] = 9
        >>> CostEstimator.from_dict(kept, 100.0).watermark, CostEstimator.from_dict(kept).watermark
        (9, 0)
        """
        new = cls(halflife)
        if "task_tokens" not in data or data.get("halflife") != halflife:
            return new
        new.watermark = int(data["watermark"])
        new._tokens = {a: [float(n), float(t)] for a, (n, t) in data["tokens"].items()}
        new._task_tokens = {(a, t): [float(n), float(s)] for a, t, n, s in data["task_tokens"]}
        new._costs = RunningCosts.from_dict(data["costs"], halflife)
        return new
