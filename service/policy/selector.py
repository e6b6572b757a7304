"""A policy that picks its own configuration from its own log (kind ``auto``).

Several candidate learners learn from the same outcomes, and each is scored off-policy as the
outcomes are applied; the one that serves changes only when a challenger is confidently better.

**Candidates** (in this order; the first serves at a cold start):

- ``correctness_ucb`` — :class:`~service.policy.correctness_ucb.CorrectnessUCB`: correctness
  per arm with a block-wise prior over the context, priced when choosing;
- ``linucb`` — :class:`~service.policy.linucb.LinUCB` on the scalar reward
  ``correct − λ·cost/cost_unit``, at the λ and cost unit the outcome's decision was priced with
  (the ``pricing`` given to :meth:`Selector.learn`: stored on the decision, so a function of the
  log, never of the instance; without it λ = 0);
- ``arm_task`` and ``arm`` — :class:`~service.policy.arm_means.ArmMeans`: each arm's mean
  correctness per task shrunk toward its overall mean, and overall alone, priced when choosing.

**Every update teaches every candidate** the logged arm's outcome (:meth:`Selector.learn`).
**Scoring** (doubly robust, from the logged propensity ``p`` of the logged arm ``A``): before
the candidates learn the outcome, each candidate ``c`` gives the distribution ``π_c(·|x)`` it
would choose from on the stored context (its current state, the outcome's pricing with each
arm's mean recorded cost), and the reward model ``r̂(x, a) = clip(P̂_a(x), 0, 1) − λ·ĉ_a /
cost_unit`` is ``correctness_ucb``'s estimate, priced; the candidate's term is::

    v_c = Σ_a π_c(a|x)·r̂(x, a) + π_c(A|x) / p · (r − r̂(x, A))      r = correct − λ·cost/unit

Running sums (count, ``Σ v_c``, ``Σ v_c·v_d`` for every pair) make every estimate and bound
exact, mergeable and a projection of the outcome stream: applied in ``reward_seq`` order, every
instance and every restart reaches the same scores. An outcome without a propensity (a
full-information warm start) teaches but is not scored.

**Switching**: once ``min_scored`` outcomes are scored, the serving candidate (the champion)
gives way to the challenger whose lower bound is highest, when that bound is above the
champion's estimate: ``v̄_ch − z·se(v_ch − v_champ) > v̄_champ`` (the bound is on the paired
difference, since all candidates are scored on the same outcomes). A switch is recorded
(:attr:`Selector.switches`: when, from, to, by how much). The choice is the serving candidate's
own, so every propensity is exact.

    >>> import numpy as np
    >>> from service.policy.base import Pricing
    >>> rng = np.random.default_rng(0)
    >>> policy = Selector(seed=0, min_scored=50)
    >>> pricing = Pricing(0.0, 0.001)
    >>> for _ in range(400):
    ...     x = np.append(1.0, rng.normal(size=3))
    ...     choice = policy.choose(["a", "b"], x, pricing=pricing)
    ...     correct = float(rng.random() < (0.8 if choice.arm == "a" else 0.3))
    ...     policy.learn(choice.arm, x, correct, 0.0001, choice.propensity, pricing)
    >>> policy.serving, [(s.old, s.new) for s in policy.switches]
    ('arm_task', [('correctness_ucb', 'arm_task')])
    >>> {s.name: round(s.value, 2) for s in policy.scores()}
    {'correctness_ucb': 0.76, 'linucb': 0.77, 'arm_task': 0.78, 'arm': 0.78}

(Here the context does not help: the arm means learn the better arm with less exploration.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from service.policy.arm_means import ArmMeans
from service.policy.base import ArmId, Choice, Context, Pricing, RoutingPolicy
from service.policy.checkpoint import PolicyState
from service.policy.correctness_ucb import CorrectnessUCB
from service.policy.linucb import LinUCB

#: The candidates, in order; the first serves at a cold start.
CANDIDATES = ("correctness_ucb", "linucb", "arm_task", "arm")


@dataclass(frozen=True)
class Switch:
    """One change of the serving candidate: after ``at`` scored outcomes (``n_updates``
    updates), from ``old`` to ``new``, whose estimated gain was ``gain`` with lower bound
    ``lower`` (both in reward per query)."""

    at: int
    n_updates: int
    old: str
    new: str
    gain: float
    lower: float


@dataclass(frozen=True)
class CandidateScore:
    """A candidate's doubly robust estimate of its mean reward per query over ``n`` scored
    outcomes (``value`` ± ``stderr``), its ``gain`` over the serving candidate and that gain's
    lower bound."""

    name: str
    n: int
    value: float
    stderr: float
    gain: float
    gain_lower: float
    serving: bool


class Selector(RoutingPolicy):
    """Candidates scored off-policy; the confidently best one serves (module doc).

    Parameters: ``alpha`` (the optimism of ``correctness_ucb`` and of the arm means),
    ``epsilon`` (every candidate's uniform mixing), ``linucb_alpha``, ``prior_weight`` (a task's
    pseudo-counts in ``arm_task``), ``z`` (width of the switching bound, in standard errors),
    ``min_scored`` (outcomes scored before any switch), ``seed``, ``project_dim`` (of the
    linear candidates).
    """

    kind = "auto"
    learns_correctness = True

    def __init__(
        self,
        alpha: float = 0.5,
        epsilon: float = 0.02,
        linucb_alpha: float = 0.1,
        prior_weight: float = 10.0,
        z: float = 3.0,
        min_scored: int = 200,
        seed: int | None = None,
        project_dim: int | None = None,
    ) -> None:
        self._candidates: dict[str, RoutingPolicy] = {}
        super().__init__(seed=seed, project_dim=project_dim)
        if z <= 0 or min_scored < 1:
            raise ValueError("z must be positive and min_scored at least 1")
        self.alpha, self.epsilon, self.linucb_alpha = alpha, epsilon, linucb_alpha
        self.prior_weight, self.z, self.min_scored = prior_weight, z, min_scored
        self._candidates = self._fresh_candidates()
        self._champion = CANDIDATES[0]
        self._arms: list[ArmId] = []
        self._learnt: list[ArmId] = []  # arms in the order outcomes taught them: scored over
        self._n_scored = 0
        self._sum = np.zeros(len(CANDIDATES))
        self._cross = np.zeros((len(CANDIDATES), len(CANDIDATES)))
        self._switches: list[Switch] = []

    def _fresh_candidates(self) -> dict[str, RoutingPolicy]:
        eps, seed, dim = self.epsilon, self.seed, self.project_dim
        cand: dict[str, RoutingPolicy] = {
            "correctness_ucb": CorrectnessUCB(
                alpha=self.alpha, epsilon=eps, seed=seed, project_dim=dim
            ),
            "linucb": LinUCB(alpha=self.linucb_alpha, epsilon=eps, seed=seed, project_dim=dim),
            "arm_task": ArmMeans(
                alpha=self.alpha,
                epsilon=eps,
                prior_weight=self.prior_weight,
                by_task=True,
                seed=seed,
            ),
            "arm": ArmMeans(alpha=self.alpha, epsilon=eps, seed=seed),
        }
        for c in cand.values():
            c.context = self.context
        return cand

    # ------------------------------------------------------------------ what it exposes
    @property
    def context(self):
        """The context builder the contexts follow; every candidate is given it."""
        return self._context

    @context.setter
    def context(self, value) -> None:
        self._context = value
        for c in self._candidates.values():
            c.context = value

    @property
    def serving(self) -> str:
        """The name of the candidate that serves now."""
        return self._champion

    def candidate(self, name: str) -> RoutingPolicy:
        """The candidate called ``name`` (one of :data:`CANDIDATES`)."""
        return self._candidates[name]

    def mean_costs(self) -> dict[ArmId, float]:
        """Each arm's mean cost over the calls :meth:`learn` was told the cost of."""
        return self._candidates[CANDIDATES[0]].mean_costs()  # type: ignore[attr-defined]

    @property
    def switches(self) -> tuple[Switch, ...]:
        """Every change of the serving candidate, oldest first."""
        return tuple(self._switches)

    @property
    def n_scored(self) -> int:
        """Outcomes scored (learnt with a propensity)."""
        return self._n_scored

    def scores(self) -> list[CandidateScore]:
        """Every candidate's estimate, gain over the serving one and its lower bound."""
        n = self._n_scored
        c = CANDIDATES.index(self._champion)
        out = []
        for i, name in enumerate(CANDIDATES):
            if n == 0:
                out.append(CandidateScore(name, 0, 0.0, math.inf, 0.0, -math.inf, i == c))
                continue
            mean = self._sum / n
            stderr = math.sqrt(max(self._cross[i, i] / n - mean[i] ** 2, 0.0) / n)
            gain = mean[i] - mean[c]
            second = (self._cross[i, i] + self._cross[c, c] - 2 * self._cross[i, c]) / n
            var = max(second - gain * gain, 0.0)
            lower = gain - self.z * math.sqrt(var / n) if i != c else 0.0
            out.append(
                CandidateScore(name, n, float(mean[i]), stderr, float(gain), float(lower), i == c)
            )
        return out

    # ------------------------------------------------------------------ choosing
    def _note_arms(self, arm_ids: Sequence[ArmId]) -> None:
        for arm in arm_ids:
            if arm not in self._arms:
                self._arms.append(arm)

    def choose(  # type: ignore[override]
        self, arm_ids: Sequence[ArmId], context: Context, pricing: Pricing | None = None
    ) -> Choice:
        """The serving candidate's choice (its probabilities: the logged propensities)."""
        champion = self._candidates[self._champion]
        self._note_arms(arm_ids)
        if champion.learns_correctness:
            return champion.choose(arm_ids, context, pricing=pricing)  # type: ignore[call-arg]
        return champion.choose(arm_ids, context)

    def choose_many(  # type: ignore[override]
        self, arm_ids: Sequence[ArmId], contexts: np.ndarray, pricing: Pricing | None = None
    ) -> list[Choice]:
        champion = self._candidates[self._champion]
        self._note_arms(arm_ids)
        if champion.learns_correctness:
            return champion.choose_many(arm_ids, contexts, pricing=pricing)  # type: ignore[call-arg]
        return champion.choose_many(arm_ids, contexts)

    # ------------------------------------------------------------------ learning
    def update(self, arm_id: ArmId, context: Context, reward: float) -> None:  # type: ignore[override]
        """The scalar path: every candidate learns ``reward``; nothing is scored."""
        self._note_arms([arm_id])
        if arm_id not in self._learnt:
            self._learnt.append(arm_id)
        for c in self._candidates.values():
            c.update(arm_id, context, reward)
        self._n_updates += 1

    def learn(
        self,
        arm_id: ArmId,
        context: Context,
        correct: float,
        cost_usd: float | None,
        propensity: float | None = None,
        pricing: Pricing | None = None,
    ) -> None:
        """Score the candidates on this outcome (with a ``propensity``), then teach each of
        them; then switch if a challenger is confidently better (module doc)."""
        if propensity is not None and not 0.0 < propensity <= 1.0:
            raise ValueError(f"propensity must be in (0, 1], got {propensity}")
        self._note_arms([arm_id])
        if arm_id not in self._learnt:
            self._learnt.append(arm_id)
        lam, unit = (0.0, 1.0) if pricing is None else (pricing.lam, pricing.cost_unit)
        reward = float(correct) - lam * (cost_usd or 0.0) / unit
        if propensity is not None:
            self._score(arm_id, context, reward, propensity, pricing)
        for c in self._candidates.values():
            if c.learns_correctness:
                c.learn(arm_id, context, correct, cost_usd)
            else:
                c.update(arm_id, context, reward)
        self._n_updates += 1
        if propensity is not None:
            self._maybe_switch()

    def _score(
        self,
        arm_id: ArmId,
        context: Context,
        reward: float,
        propensity: float,
        pricing: Pricing | None,
    ) -> None:
        arms = self._learnt  # not the arms offered to this instance: those of the log alone
        model = self._candidates["correctness_ucb"]
        assert isinstance(model, CorrectnessUCB)
        lam, unit = (0.0, 1.0) if pricing is None else (pricing.lam, pricing.cost_unit)
        given = None if pricing is None else pricing.est_cost
        scoring = Pricing(lam, unit, given if given is not None else model.mean_costs())
        P = np.empty((len(CANDIDATES), len(arms)))
        P[0], mean = model.distribution(arms, context, scoring)
        r_hat = np.clip(model.prior_mean + mean, 0.0, 1.0) - scoring.penalties(arms)
        for i, name in enumerate(CANDIDATES[1:], start=1):
            c = self._candidates[name]
            if isinstance(c, ArmMeans):
                P[i] = c.probabilities(arms, context, scoring)
            else:
                assert isinstance(c, LinUCB)
                P[i] = c.distribution(arms, context)[0]
        a = arms.index(arm_id)
        v = P @ r_hat + P[:, a] / propensity * (reward - r_hat[a])
        self._n_scored += 1
        self._sum += v
        self._cross += np.outer(v, v)

    def _maybe_switch(self) -> None:
        if self._n_scored < self.min_scored:
            return
        best = max(
            (s for s in self.scores() if not s.serving), key=lambda s: (s.gain_lower, s.name)
        )
        if best.gain_lower > 0.0:
            self._switches.append(
                Switch(
                    self._n_scored,
                    self._n_updates,
                    self._champion,
                    best.name,
                    best.gain,
                    best.gain_lower,
                )
            )
            self._champion = best.name

    def reseed(self, seed: int | None) -> None:
        super().reseed(seed)
        for c in self._candidates.values():
            c.reseed(seed)

    # ------------------------------------------------------------------ arms, merge, state
    @property
    def arms(self) -> list[ArmId]:
        return list(self._arms)

    def remove_arm(self, arm_id: ArmId) -> None:
        if arm_id not in self._arms:
            raise KeyError(arm_id)
        self._arms.remove(arm_id)
        if arm_id in self._learnt:
            self._learnt.remove(arm_id)
        for c in self._candidates.values():
            if arm_id in c.arms:
                c.remove_arm(arm_id)

    def merge(self, other: Selector) -> Selector:
        """Every candidate merged, the scores' sums added; ``self``'s serving candidate and
        switches, then the switching rule applied once to the merged scores."""
        self._merge_common(other)
        new = type(self)(**self._get_params())
        new._rng.bit_generator.state = self._rng.bit_generator.state
        new._candidates = {
            name: c.merge(other._candidates[name])  # type: ignore[arg-type]
            for name, c in self._candidates.items()
        }
        new.context = self.context if self.context is not None else other.context
        new._n_updates = self._n_updates + other._n_updates
        new._arms = self._arms + [a for a in other._arms if a not in self._arms]
        new._learnt = self._learnt + [a for a in other._learnt if a not in self._learnt]
        new._n_scored = self._n_scored + other._n_scored
        new._sum = self._sum + other._sum
        new._cross = self._cross + other._cross
        new._champion, new._switches = self._champion, list(self._switches)
        new._maybe_switch()
        return new

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta: dict = {
            "serving": self._champion,
            "learnt": self._learnt,
            "n_scored": self._n_scored,
            "switches": [asdict(s) for s in self._switches],
            "candidates": {},
        }
        arrays = {"sum": self._sum.copy(), "cross": self._cross.copy()}
        for name, c in self._candidates.items():
            st = c.checkpoint_state()
            meta["candidates"][name] = {
                "params": st.params,
                "arms": st.arms,
                "n_updates": st.n_updates,
                "rng": st.rng,
                "input_dim": st.input_dim,
                "feature_names": st.feature_names,
                "state": st.meta,
            }
            arrays.update({f"{name}__{k}": v for k, v in st.arrays.items()})
            if st.projection is not None:
                arrays[f"{name}__projection"] = st.projection
        return meta, arrays

    def _load_state(self, meta: dict, arms: list, arrays: Mapping[str, np.ndarray]) -> None:
        self._arms = list(arms)
        self._champion, self._learnt = meta["serving"], list(meta["learnt"])
        self._n_scored = int(meta["n_scored"])
        self._switches = [Switch(**s) for s in meta["switches"]]
        self._sum, self._cross = np.array(arrays["sum"]), np.array(arrays["cross"])
        for name, cm in meta["candidates"].items():
            prefix = f"{name}__"
            own = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            projection = own.pop("projection", None)
            cls = type(self._candidates[name])
            state = PolicyState(
                kind=cls.kind,
                params=cm["params"],
                arms=cm["arms"],
                n_updates=cm["n_updates"],
                rng=cm["rng"],
                input_dim=cm["input_dim"],
                feature_names=cm["feature_names"],
                projection=projection,
                meta=cm["state"],
                arrays=own,
                context=self.context,
            )
            self._candidates[name] = cls.from_checkpoint_state(state)
