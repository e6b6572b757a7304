"""River's non-contextual UCB and Thompson sampling, wrapped as baselines with propensities.

The wrapped ``river.bandit`` object keeps the statistics and learns (``update`` is River's);
the wrapper computes River's own decision rule from that state and draws the arm itself, so
it can report the distribution it drew from. Contexts are accepted and ignored.

* :class:`RiverUCB` wraps ``bandit.UCB``: scores are River's upper bounds
  ``mean + delta·sqrt(2·ln n / n_a)`` (never-pulled arms: +∞, i.e. explored first; they are
  left out of ``scores`` since ∞ is not JSON). Probabilities are exact:
  ``(1−ε)·argmax(ties split evenly) + ε/k``.
* :class:`RiverThompson` wraps ``bandit.ThompsonSampling`` with ``proba.Beta`` posteriors.
  Rewards in [0, 1] are fed as Bernoulli trials ``1[u < r]`` (rewards are clipped to
  [0, 1] first; the standard binarisation of Agrawal & Goyal 2012). **Probabilities are
  estimated by sampling** (``n_samples`` posterior draws per decision); the arm is drawn from
  exactly the logged ``(1−ε)·p̂ + ε/k``. Never-pulled arms share the ``1−ε`` mass.

    >>> policy = RiverUCB(delta=0.5, epsilon=0.0, seed=0)
    >>> policy.update("a", None, 1.0); policy.update("b", None, 0.0)
    >>> policy.choose(["a", "b"], None).probabilities
    {'a': 1.0, 'b': 0.0}
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence

import numpy as np
from river import bandit, proba

from service.policy.base import (
    ArmId,
    Choice,
    Context,
    RoutingPolicy,
    draw,
    mixed_greedy_probabilities,
)


class _RiverBaseline(RoutingPolicy):
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

    def _merge_into(self, new: _RiverBaseline, other: _RiverBaseline) -> None:
        raise NotImplementedError

    def merge(self, other: _RiverBaseline) -> _RiverBaseline:
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


class RiverUCB(_RiverBaseline):
    """``river.bandit.UCB(delta)`` with exact ε-mixed probabilities (see module docstring)."""

    kind = "ucb"

    def __init__(self, delta: float = 1.0, epsilon: float = 0.05, seed: int | None = None) -> None:
        super().__init__(epsilon=epsilon, seed=seed)
        self.delta = delta
        self._river = bandit.UCB(delta=delta, seed=seed)

    def upper_bounds(self, arm_ids: Sequence[ArmId]) -> np.ndarray:
        """River's UCB ``_pull`` scores for ``arm_ids`` (+∞ for never-updated arms)."""
        river = self._river
        out = np.empty(len(arm_ids))
        for j, arm in enumerate(arm_ids):
            stat = river._rewards.get(arm)
            if stat is None or river._counts[arm] == 0:
                out[j] = math.inf
            elif isinstance(stat, proba.base.Distribution):
                out[j] = stat.mode
            else:
                bonus = math.sqrt(2 * math.log(river._n) / river._counts[arm])
                out[j] = stat.get() + self.delta * bonus
        return out

    def choose(self, arm_ids: Sequence[ArmId], context: Context | None = None) -> Choice:
        """Draw an arm among ``arm_ids`` (context ignored) with exact probabilities."""
        self._register(arm_ids)
        bounds = self.upper_bounds(arm_ids)
        p = mixed_greedy_probabilities(bounds, self.epsilon)[0]
        j = draw(p, self._rng.random())
        return Choice(
            arm=arm_ids[j],
            probabilities=dict(zip(arm_ids, p.tolist(), strict=True)),
            scores={
                a: s for a, s in zip(arm_ids, bounds.tolist(), strict=True) if math.isfinite(s)
            },
        )

    def _merge_into(self, new: _RiverBaseline, other: _RiverBaseline) -> None:
        for arm, stat in other._river._rewards.items():
            if arm in new._river._rewards:
                new._river._rewards[arm] += stat  # river.stats.Mean supports exact merging
            else:
                new._river._rewards[arm] = stat.clone(include_attributes=True)


class RiverThompson(_RiverBaseline):
    """``river.bandit.ThompsonSampling(proba.Beta(alpha, beta))`` with sampled probabilities."""

    kind = "thompson"

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        epsilon: float = 0.05,
        n_samples: int = 512,
        seed: int | None = None,
    ) -> None:
        super().__init__(epsilon=epsilon, seed=seed)
        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        self.alpha = alpha
        self.beta = beta
        self.n_samples = n_samples
        self._river = bandit.ThompsonSampling(reward_obj=proba.Beta(alpha, beta), seed=seed)

    def _learn(self, arm_id: ArmId, reward: float) -> None:
        success = self._rng.random() < min(max(reward, 0.0), 1.0)
        self._river.update(arm_id, success)

    def posterior(self, arm_id: ArmId) -> tuple[float, float]:
        """Beta posterior ``(alpha, beta)`` of ``arm_id`` (the prior for unknown arms)."""
        dist = self._river._rewards.get(arm_id)
        return (self.alpha, self.beta) if dist is None else (dist.alpha, dist.beta)

    def choose(self, arm_ids: Sequence[ArmId], context: Context | None = None) -> Choice:
        """Draw an arm among ``arm_ids`` (context ignored); probabilities by sampling."""
        self._register(arm_ids)
        k = len(arm_ids)
        params = np.array([self.posterior(a) for a in arm_ids])
        means = params[:, 0] / params.sum(axis=1)
        unexplored = np.array([self._river._counts[a] == 0 for a in arm_ids])
        if unexplored.any():
            p = (1.0 - self.epsilon) * unexplored / unexplored.sum() + self.epsilon / k
        else:
            samples = self._rng.beta(params[:, 0], params[:, 1], size=(self.n_samples, k))
            wins = np.bincount(samples.argmax(axis=1), minlength=k)
            p = (1.0 - self.epsilon) * wins / self.n_samples + self.epsilon / k
        j = draw(p, self._rng.random())
        return Choice(
            arm=arm_ids[j],
            probabilities=dict(zip(arm_ids, p.tolist(), strict=True)),
            scores=dict(zip(arm_ids, means.tolist(), strict=True)),
        )

    def _merge_into(self, new: _RiverBaseline, other: _RiverBaseline) -> None:
        for arm, dist in other._river._rewards.items():
            mine = new._river._rewards.get(arm)
            if mine is None:
                new._river._rewards[arm] = pickle.loads(pickle.dumps(dist))  # noqa: S301
            else:
                mine.alpha += dist.alpha - dist._alpha
                mine.beta += dist.beta - dist._beta
