"""Drift: noticing that an arm's accuracy moved, and forgetting what it was.

A learner that sums every outcome since the start moves its estimate of an arm by ``1/n`` per
outcome: after 2,000 calls at 90 %, an arm now right 60 % of the time keeps a high estimate for
thousands of calls. :class:`ChangeDetector` watches, per arm, the residuals ``e = correct −
P̂(x)`` of the outcomes it learns (each taken *before* the outcome is learnt), with a
two-sided CUSUM (Page 1954)::

    S⁺ ← max(0, S⁺ + e − k)        S⁻ ← max(0, S⁻ − e − k)        alarm when S⁺ or S⁻ > h

A well-fitted model's residuals average 0, so the sums stay near 0; a shift of the arm's
accuracy by ``Δ > k`` makes one of them grow by about ``Δ − k`` per outcome, so the alarm
comes about ``h / (Δ − k)`` outcomes of that arm after the change (a drop 0.9 → 0.6 with
``h = 10``: ~50 outcomes), while noise alone (residuals of standard deviation ~0.45) raises
a false alarm only every ~10⁵ outcomes of an arm. On an alarm the learner shrinks that arm's
statistics (its evidence weighs ``shrink`` times what it did: see ``LinearArmStats.shrink``)
so new outcomes dominate within a few dozen calls, and the arm's sums restart. The first
``warmup`` outcomes of an arm (after a start or an alarm) are not watched: its estimate is
still moving then.

The state is a few numbers per arm, updated in the order outcomes are learnt (``reward_seq``
in the service), so it is a projection of the log like the rest of the policy.

    >>> detector = ChangeDetector(threshold=5.0)
    >>> [detector.observe("a", 0.1) for _ in range(60)].count(True)   # within the allowance
    0
    >>> alarms = [detector.observe("a", -0.3) for _ in range(40)]     # a drop of 0.3
    >>> alarms.index(True)   # S⁻ grows by 0.3 − 0.1 a step: above 5 at the 26th
    25
    >>> detector.state("a"), detector.alarms   # restarted: 14 outcomes into its warm-up
    ([14.0, 0.0, 0.0], 1)
"""

from __future__ import annotations

from collections.abc import Mapping


class ChangeDetector:
    """Two-sided CUSUM on each arm's residuals (module doc): ``threshold`` ``h``,
    ``allowance`` ``k`` (shifts smaller than it are ignored), ``warmup`` outcomes not watched
    after a start or an alarm."""

    def __init__(self, threshold: float, allowance: float = 0.1, warmup: int = 30) -> None:
        if threshold <= 0 or allowance < 0 or warmup < 0:
            raise ValueError("threshold must be positive, allowance and warmup >= 0")
        self.threshold, self.allowance, self.warmup = threshold, allowance, warmup
        self._sums: dict[str, list[float]] = {}  # arm → [outcomes since restart, S⁺, S⁻]
        self.alarms = 0

    def observe(self, arm: str, residual: float) -> bool:
        """One residual of ``arm``; True when it raises an alarm (the arm's sums restart)."""
        s = self._sums.setdefault(arm, [0.0, 0.0, 0.0])
        s[0] += 1
        if s[0] <= self.warmup:
            return False
        s[1] = max(0.0, s[1] + residual - self.allowance)
        s[2] = max(0.0, s[2] - residual - self.allowance)
        if s[1] > self.threshold or s[2] > self.threshold:
            self._sums[arm] = [0.0, 0.0, 0.0]
            self.alarms += 1
            return True
        return False

    def state(self, arm: str) -> list[float]:
        """``[outcomes since restart, S⁺, S⁻]`` of ``arm``."""
        return list(self._sums.get(arm, [0.0, 0.0, 0.0]))

    def forget(self, arm: str) -> None:
        self._sums.pop(arm, None)

    def to_dict(self) -> dict:
        return {"sums": {a: list(s) for a, s in self._sums.items()}, "alarms": self.alarms}

    def load(self, data: Mapping) -> None:
        self._sums = {a: [float(v) for v in s] for a, s in data["sums"].items()}
        self.alarms = int(data["alarms"])
