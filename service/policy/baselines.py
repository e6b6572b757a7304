"""River's non-contextual bandits as baselines with propensities: the shared part.

The baselines compute River's decision rules (``bandit.UCB``, ``bandit.ThompsonSampling``) from
statistics they keep themselves, in River's terms — each arm's pulls, the total pulls ``n`` and
each arm's reward statistic — and draw the arm themselves, so they can report the distribution
they drew from. River keeps those statistics in private attributes; keeping our own means no
River release can change them under us. Contexts are accepted and ignored. The baselines:
:class:`~service.policy.ucb.RiverUCB` and :class:`~service.policy.thompson.RiverThompson`.
"""

from __future__ import annotations

import copy
import pickle
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.policy.base import ArmId, Context, RoutingPolicy


class RiverBaseline(RoutingPolicy):
    """Shared plumbing: arms, pull counts, update counting, merging and checkpoints. A subclass
    keeps one reward statistic per arm (:meth:`_learn`, :meth:`_stats`, :meth:`_add_stats`)."""

    def __init__(self, epsilon: float, seed: int | None) -> None:
        super().__init__(seed=seed, project_dim=None)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        self.epsilon = epsilon
        self._arm_list: list[ArmId] = []
        self._pulls: Counter[ArmId] = Counter()  # updates per arm (River's ``_counts``)
        self._total = 0  # updates of every arm, removed ones too (River's ``_n``)

    @property
    def arms(self) -> list[ArmId]:
        return list(self._arm_list)

    def pulls(self, arm_id: ArmId) -> int:
        """How many rewards ``arm_id`` has learned from (0 for an unknown arm)."""
        return self._pulls[arm_id]

    def _register(self, arm_ids: Sequence[ArmId]) -> None:
        if not arm_ids:
            raise ValueError("arm_ids is empty")
        if len(set(arm_ids)) != len(arm_ids):
            raise ValueError(f"duplicate arm ids in {list(arm_ids)!r}")
        for arm in arm_ids:
            if arm not in self._arm_list:
                self._arm_list.append(arm)

    def update(self, arm_id: ArmId, context: Context | None, reward: float) -> None:  # type: ignore[override]
        """River's ``update(arm_id, reward)``; the context is ignored."""
        self._register([arm_id])
        self._pulls[arm_id] += 1
        self._total += 1
        self._learn(arm_id, float(reward))
        self._n_updates += 1

    def remove_arm(self, arm_id: ArmId) -> None:
        """Forget ``arm_id`` (KeyError if unknown). The total pull count ``n`` is kept, as
        River keeps it."""
        if arm_id not in self._arm_list:
            raise KeyError(arm_id)
        self._arm_list.remove(arm_id)
        self._pulls.pop(arm_id, None)
        self._forget(arm_id)

    def merge(self, other: RiverBaseline) -> RiverBaseline:
        """A new policy with both policies' statistics summed (the result keeps our RNG)."""
        self._merge_common(other)
        new = copy.deepcopy(self)
        for arm in other._arm_list:
            if arm not in new._arm_list:
                new._arm_list.append(arm)
        new._add_stats(other)
        new._pulls.update(other._pulls)
        new._total += other._total
        new._n_updates = self._n_updates + other._n_updates
        return new

    # ---------------------------------------------------------------- per subclass
    def _learn(self, arm_id: ArmId, reward: float) -> None:
        """Fold ``reward`` into ``arm_id``'s statistic (its pull is counted already)."""
        raise NotImplementedError

    def _forget(self, arm_id: ArmId) -> None:
        raise NotImplementedError

    def _add_stats(self, other: RiverBaseline) -> None:
        """Add ``other``'s per-arm statistics to ours (pulls not yet added)."""
        raise NotImplementedError

    def _stats(self) -> dict[str, np.ndarray]:
        """The per-arm statistics as arrays in ``arms`` order."""
        raise NotImplementedError

    def _load_stats(self, arms: list, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _load_river_stats(self, rewards: dict[ArmId, Any]) -> None:
        """Take the per-arm reward objects of a River policy (older checkpoints)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_params(self) -> tuple[dict, dict[str, np.ndarray]]:
        return self._get_params(), {}

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        pulls = np.array([self._pulls[a] for a in self._arm_list], dtype=np.int64)
        return {"n": self._total}, {"pulls": pulls, **self._stats()}

    def _load_state(self, meta: dict, arms: list, arrays: dict[str, np.ndarray]) -> None:
        self._arm_list = list(arms)
        if "pickle_river" in arrays:
            self._load_river_pickle(arrays["pickle_river"].tobytes())
            return
        self._total = int(meta["n"])
        self._pulls = Counter(dict(zip(arms, arrays["pulls"].tolist(), strict=True)))
        self._load_stats(arms, arrays)

    def _load_river_pickle(self, blob: bytes) -> None:
        """Checkpoints written before the baselines kept their own statistics hold the River
        policy object itself, pickled. Its statistics are read once, here, from River's
        attributes as River ≤ 0.26 names them (``_n``, ``_counts``, ``_rewards``)."""
        river = pickle.loads(blob)  # noqa: S301 - our own store
        state = vars(river)
        self._total = int(state["_n"])
        self._pulls = Counter({a: int(c) for a, c in state["_counts"].items() if c})
        self._load_river_stats(dict(state["_rewards"]))
