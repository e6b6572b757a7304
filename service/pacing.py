"""Budget mode: adapt the cost weight λ online so the realised mean cost meets a target.

The router maximises ``E[correct] − λ·E[cost]/cost_unit``. Given a target mean cost per query
``c*``, λ is the Lagrange multiplier of the constraint ``E[cost] ≤ c*`` and is found by projected
subgradient steps on the dual, one per observed cost::

    λ ← clip(λ + lr · (cost − c*) / cost_unit, 0, lam_max)

Summing the steps gives the controller's guarantee: between two times ``s < t`` (as long as λ
was not clipped) ``Σ (cost − c*) = cost_unit · (λ_t − λ_s) / lr``, so the realised mean cost over
a window of ``n`` queries is off the target by only ``cost_unit·Δλ / (lr·n)``.

    >>> pacer = BudgetPacer(target_cost_per_query=0.001, cost_unit=0.001, lr=0.5)
    >>> pacer.observe(0.003)        # over budget: λ rises, returns the new λ
    1.0
    >>> pacer.observe(0.0)          # under budget: λ falls
    0.5
    >>> BudgetPacer.from_dict(pacer.to_dict()) == pacer
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class BudgetPacer:
    """Projected dual-subgradient controller for λ (see module docstring).

    ``target_cost_per_query`` and ``cost_unit`` are in USD; ``lr`` is the step per
    ``cost_unit`` of excess cost; ``lam0`` the starting λ; ``lam_max`` an optional cap.
    """

    target_cost_per_query: float
    cost_unit: float
    lr: float = 0.05
    lam0: float = 0.0
    lam_max: float = math.inf
    lam: float = field(default=math.nan)
    n_observed: int = 0
    total_cost_usd: float = 0.0

    def __post_init__(self) -> None:
        if self.target_cost_per_query < 0:
            raise ValueError("target_cost_per_query must be >= 0")
        if self.cost_unit <= 0:
            raise ValueError("cost_unit must be positive")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if not 0 <= self.lam0 <= self.lam_max:
            raise ValueError("need 0 <= lam0 <= lam_max")
        if math.isnan(self.lam):
            self.lam = float(self.lam0)

    def observe(self, cost_usd: float) -> float:
        """Account for one served query's cost; returns the new λ."""
        if not cost_usd >= 0:  # also rejects NaN
            raise ValueError(f"cost_usd must be >= 0, got {cost_usd}")
        step = self.lr * (cost_usd - self.target_cost_per_query) / self.cost_unit
        self.lam = min(max(self.lam + step, 0.0), self.lam_max)
        self.n_observed += 1
        self.total_cost_usd += cost_usd
        return self.lam

    @property
    def mean_cost_usd(self) -> float:
        """Realised mean cost per observed query (NaN before the first)."""
        return self.total_cost_usd / self.n_observed if self.n_observed else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state (``inf`` cap stored as ``None``)."""
        state = asdict(self)
        if math.isinf(state["lam_max"]):
            state["lam_max"] = None
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> BudgetPacer:
        state = dict(state)
        if state.get("lam_max") is None:
            state["lam_max"] = math.inf
        return cls(**state)
