"""River's non-contextual bandits wrapped as baselines with propensities: the shared part.

The wrapped ``river.bandit`` object keeps the statistics and learns (``update`` is River's);
the wrapper computes River's own decision rule from that state and draws the arm itself, so
it can report the distribution it drew from. Contexts are accepted and ignored. The
baselines: :class:`~service.policy.ucb.RiverUCB` and
:class:`~service.policy.thompson.RiverThompson`.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np
from river import bandit

from service.policy.base import ArmId, Context, RoutingPolicy


class RiverBaseline(RoutingPolicy):
    """Shared plumbing: the wrapped River policy, arms, update counting, checkpoints."""

    _river: bandit.base.Policy

    def __init__(self, epsilon: float, seed: int | None) -> None:
        super().__init__(seed=seed, project_dim=None)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        self.epsilon = epsilon
        self._arm_list: list[ArmId] = []

    @property
    def arms(self) -> list[ArmId]:
        return list(self._arm_list)

    @property
    def river_policy(self) -> bandit.base.Policy:
        """The wrapped River policy (its statistics are the learned state)."""
        return self._river

    def _register(self, arm_ids: Sequence[ArmId]) -> None:
        if not arm_ids:
            raise ValueError("arm_ids is empty")
        if len(set(arm_ids)) != len(arm_ids):
            raise ValueError(f"duplicate arm ids in {list(arm_ids)!r}")
        for arm in arm_ids:
            if arm not in self._arm_list:
                self._arm_list.append(arm)

    def _learn(self, arm_id: ArmId, reward: float) -> None:
        self._river.update(arm_id, reward)

    def update(self, arm_id: ArmId, context: Context | None, reward: float) -> None:  # type: ignore[override]
        """River's ``update(arm_id, reward)``; the context is ignored."""
        self._register([arm_id])
        self._learn(arm_id, float(reward))
        self._n_updates += 1

    def remove_arm(self, arm_id: ArmId) -> None:
        """Forget ``arm_id`` (KeyError if unknown). River's global pull count ``n`` is kept."""
        if arm_id not in self._arm_list:
            raise KeyError(arm_id)
        self._arm_list.remove(arm_id)
        self._river._counts.pop(arm_id, None)
        self._river._rewards.pop(arm_id, None)

    def _merge_into(self, new: RiverBaseline, other: RiverBaseline) -> None:
        raise NotImplementedError

    def merge(self, other: RiverBaseline) -> RiverBaseline:
        """A new policy with both policies' statistics summed (the result keeps our RNG)."""
        self._merge_common(other)
        new = pickle.loads(pickle.dumps(self))  # noqa: S301 - deep copy of ourselves
        for arm in other._arm_list:
            if arm not in new._arm_list:
                new._arm_list.append(arm)
        self._merge_into(new, other)
        new._river._n += other._river._n
        for arm, count in other._river._counts.items():
            new._river._counts[arm] += count
        new._n_updates = self._n_updates + other._n_updates
        return new

    def _checkpoint_params(self) -> tuple[dict, dict[str, np.ndarray]]:
        return self._get_params(), {}

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        blob = pickle.dumps(self._river, protocol=pickle.HIGHEST_PROTOCOL)
        return {}, {"pickle_river": np.frombuffer(blob, dtype=np.uint8)}

    def _load_state(self, meta: dict, arms: list, arrays: dict[str, np.ndarray]) -> None:
        self._river = pickle.loads(arrays["pickle_river"].tobytes())  # noqa: S301 - own store
        self._arm_list = list(arms)
