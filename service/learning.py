"""The live policy: a projection of the learning log in Postgres, which every instance computes.

The learning log is two sequences on the ``decisions`` table: ``reward_seq`` (a reward and
the context it was earned on) and ``decision_seq`` (a decision's task, length, metadata and
cost), both numbered in commit order across every process (:mod:`service.log.transaction`).

Invariant: ``policy == checkpoint + every reward with seq > its watermark, applied in seq
order`` — and the context builder's statistics and, in budget mode, λ (a
:class:`BudgetPacer`) are the same projection of the decision log. Any instance, its own
rewards or another's, applies each reward once, in seq order, so all instances converge to
the same statistics. :class:`LivePolicy` is that projection and nothing else: it neither reads
the log nor stores checkpoints (the learning log's wing, :mod:`service.log`, does both).

Its checkpoint holds the policy's state with the pacer and the context builder beside it (the
header fields ``pacer`` and ``context`` of :mod:`service.policy.checkpoint`); the policy
object itself carries neither, so a policy is only a policy.

A policy learns from contexts of one layout only: loading a checkpoint (or replaying rewards)
of another layout than the configured one raises :class:`ContextMismatch`, rather than mixing
vectors that mean different things.

    >>> import numpy as np
    >>> from service.decision import LoggedDecision
    >>> live = LivePolicy("linucb", {"seed": 0})
    >>> live.observe([LoggedDecision(1, 0.002, "qa", 12, None)])
    >>> rewards = [AppliedReward(seq, "q", "cheap", np.ones(3), 1.0, live.context.spec)
    ...            for seq in (1, 2)]
    >>> live.follows(rewards[1:], []), live.follows(rewards, [])   # reward 1 is not applied
    (False, True)
    >>> live.apply(rewards), live.apply(rewards)                    # each once, in seq order
    (2, 0)
    >>> live.watermark, live.decision_watermark, live.policy.n_updates
    (2, 1, 2)
    >>> copy = LivePolicy("linucb", {"seed": 0})
    >>> copy.load(live.snapshot().state, 2, 1, "a snapshot"), copy.policy.n_updates
    (True, 2)
    >>> other = LivePolicy("correctness_ucb", {"seed": 0})   # another policy is configured:
    >>> other.load(live.snapshot().state, 2, 1, "a snapshot"), other.watermark   # rebuilt
    (False, 0)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from service import metrics
from service.context import LEGACY, ContextBuilder, ContextLayout
from service.decision import LoggedDecision
from service.log.rows import AppliedReward
from service.pacing import BudgetPacer
from service.policy import Choice, Pricing, RoutingPolicy, make_policy
from service.policy.checkpoint import PolicyState, dump_state, from_state, load_state
from service.policy.conservative import Conservative, ConservativeGuard
from service.pricing import ArmPrice, CostEstimator
from service.reward import RewardSettings

log = logging.getLogger(__name__)


def instance_seed(policy_seed: int | None, instance: str, start: int) -> int:
    """The seed of one instance's random draws: distinct per instance and per start (``start``
    is the decision log's length then), and reproducible from what the decisions record.

    >>> instance_seed(0, "a", 10) == instance_seed(0, "a", 10)
    True
    >>> len({instance_seed(0, "a", 10), instance_seed(0, "b", 10), instance_seed(0, "a", 11)})
    3
    """
    digest = hashlib.blake2b(f"{policy_seed}|{instance}|{start}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1  # fits a signed BIGINT


def _contiguous(seqs: Sequence[int], after: int) -> bool:
    return sorted(seqs) == list(range(after + 1, after + 1 + len(seqs)))


@dataclass(frozen=True)
class Snapshot:
    """The policy's state and both watermarks, copied together: a checkpoint's contents."""

    policy: str
    n_updates: int
    watermark: int
    decision_watermark: int
    state: bytes


class LivePolicy:
    """The policy of a running service instance, shared by its query and label consumers:
    the policy, its context builder and budget pacer, and the watermarks they have reached.
    Callers hold :attr:`lock` across reading the log and applying it."""

    def __init__(
        self,
        policy_name: str,
        policy_params: dict,
        budget: BudgetPacer | None = None,
        context: ContextBuilder | None = None,
        cost_unit: float = 0.001,
        conservative: Mapping[str, Conservative] | None = None,
    ) -> None:
        self.policy_name = policy_name
        #: the cost unit λ applies per (METALLM_COST_UNIT_USD): with a decision's stored λ, the
        #: pricing an outcome is scored off-policy at (:meth:`learn`)
        self.cost_unit = cost_unit
        self.policy_params = dict(policy_params)
        self.policy: RoutingPolicy = make_policy(policy_name, **policy_params)
        #: each arm's recorded output tokens and costs: a projection of the decision log
        self.costs = CostEstimator(self._cost_halflife())
        self.configured_pacer = budget  # budget mode's pacer to start from (None: fixed λ)
        self.pacer = budget  # budget mode's λ, a projection of the decision log
        #: the configured context layout (a fresh builder): what a restored policy must match
        self.configured_context = context or ContextBuilder(ContextLayout())
        #: the builder (with its running statistics) of the contexts the policy learns from
        self.context = copy.deepcopy(self.configured_context)
        self._give_layout()
        #: conservative mode's rules by task (the config's ``baseline`` and ``tolerance``)
        self.conservative = dict(conservative or {})
        #: their budgets: decisions counted from the decision log, outcomes from the reward log
        self.guard = ConservativeGuard(self.conservative) if self.conservative else None
        self.lock = threading.RLock()
        self.watermark = 0  # highest reward_seq applied to self.policy
        self.decision_watermark = 0  # highest decision_seq the builder and pacer have seen

    def _cost_halflife(self) -> float | None:
        """How fast recorded costs are forgotten: the policy's ``cost_halflife`` (drift; None:
        never), as the bench's estimates do."""
        return getattr(self.policy, "cost_halflife", None)

    def _give_layout(self) -> None:
        """A policy that learns correctness shapes its prior by the context layout (block by
        block, fixed at its first context): it is shown the builder, as the bench does. Other
        policies carry nothing beside their statistics."""
        if self.policy.learns_correctness:
            self.policy.context = self.context

    def reward_settings(self, base: RewardSettings) -> RewardSettings:
        """The reward settings in force now: ``base``, with λ from the pacer in budget mode."""
        pacer = self.pacer
        return base if pacer is None else replace(base, lam=pacer.lam)

    def pricing(
        self,
        base: RewardSettings,
        prices: Mapping[str, ArmPrice | None],
        n_chars: int,
        prompt_chars: int | None = None,
        task: str | None = None,
    ) -> Pricing | None:
        """What a query of ``n_chars`` characters (its prompt ``prompt_chars``) is priced at
        now, for a policy that learns correctness (None for the others): the λ in force, and
        each arm's call cost estimated from its ``prices`` (None: its recorded costs) and the
        log (:mod:`service.pricing`)."""
        if not self.policy.learns_correctness:
            return None
        settings = self.reward_settings(base)
        est = self.costs.estimate(prices, n_chars, prompt_chars, task)
        return Pricing(settings.lam, settings.cost_unit, est)

    def follows(
        self, rewards: Sequence[AppliedReward], decisions: Sequence[LoggedDecision]
    ) -> bool:
        """Whether these entries come right after the watermarks, none missing."""
        return _contiguous([d.seq for d in decisions], self.decision_watermark) and (
            _contiguous([r.seq for r in rewards], self.watermark)
        )

    def observe(self, logged: Sequence[LoggedDecision]) -> None:
        """Observe decisions of the log after the decision watermark, in ``decision_seq``
        order (the builder's statistics and the pacer's λ)."""
        for d in sorted(logged, key=lambda d: d.seq):
            if d.seq <= self.decision_watermark:
                continue
            if self.pacer is not None:
                self.pacer.observe(d.cost_usd)
            self.context.observe(d.task, d.n_chars, d.metadata)
            if self.guard is not None:
                self.guard.played(d.task, d.arm)
            self.observe_costs([d])
            self.decision_watermark = d.seq

    def observe_costs(self, logged: Sequence[LoggedDecision]) -> None:
        """Feed the cost estimates decisions they have not seen (in ``decision_seq`` order)."""
        for d in logged:
            self.costs.observe(
                d.seq, d.arm, d.cost_usd, d.n_chars, d.output_tokens, d.cost_unknown, d.task
            )

    def apply(self, rewards: Sequence[AppliedReward]) -> int:
        """Apply rewards of the log (in seq order, none missing above the watermark); returns
        how many were above it."""
        applied = 0
        for r in sorted(rewards, key=lambda r: r.seq):
            if r.seq <= self.watermark:
                continue
            if r.layout == self.context.spec:
                self.learn(r)
            else:  # decided before a change of layout (restart refuses those it replays)
                log.warning(
                    "reward %d of %s is on a context of layout %r, not %r: not learned",
                    r.seq,
                    r.query_id,
                    r.layout,
                    self.context.spec,
                )
            metrics.REWARD.labels(r.arm).observe(r.reward)
            if r.age_s is not None:
                metrics.LEARNING_LAG.observe(r.age_s)
            self.watermark = r.seq
            applied += 1
        return applied

    def learn(self, r: AppliedReward) -> None:
        """Teach the policy one reward of the log: a policy that learns correctness its
        correctness and cost, with the decision's logged propensity and the λ it was priced
        at (so a policy that scores itself off-policy, ``auto``, scores every outcome as the
        bench does); any other the reward. All of it a function of the log row alone.
        Conservative mode's guard learns the outcome of its task."""
        if self.guard is not None and r.task is not None:
            self.guard.learned(r.task, r.arm, r.correctness(), r.cost_usd)
        if self.policy.learns_correctness:
            pricing = None if r.lam is None else Pricing(r.lam, self.cost_unit)
            propensity = r.propensity if pricing is not None else None
            self.policy.learn(r.arm, r.context, r.correctness(), r.cost_usd, propensity, pricing)
        else:
            self.policy.update(r.arm, r.context, r.reward)

    def check_replay(self, rewards: Sequence[AppliedReward]) -> None:
        """Raise :class:`ContextMismatch` if rewards to replay are of another layout."""
        other = sorted({r.layout for r in rewards} - {self.context.spec})
        if other:
            raise ContextMismatch(
                _mismatch(f"{len(rewards)} stored rewards", other[0], self.context.spec)
            )

    def snapshot(self) -> Snapshot:
        """The policy's state, its pacer and context builder, and the watermarks, copied under
        :attr:`lock`."""
        with self.lock:
            state = self.policy.checkpoint_state()
            state.pacer, state.context = self.pacer, self.context
            state.costs = self.costs.to_dict()
            state.conservative = None if self.guard is None else self.guard.to_dict()
            return Snapshot(
                self.policy_name,
                self.policy.n_updates,
                self.watermark,
                self.decision_watermark,
                dump_state(state),
            )

    def load(self, state: bytes, watermark: int, decision_watermark: int, source: str) -> bool:
        """Continue from a stored state (a checkpoint, named ``source`` in errors), keeping its
        pacer, context builder and cost estimates if the configuration still matches them. A
        checkpoint stored before they were kept beside the policy reads the same: they were in
        the same fields (cost estimates it lacks start empty, at decision watermark 0).

        Returns whether the stored policy is the configured one (kind and parameters). If it
        is not, the configured policy starts fresh at reward watermark 0, so that the caller
        rebuilds it from the whole reward log: a change of policy never goes unnoticed."""
        with self.lock:
            stored = load_state(state)
            pacer, context, costs = stored.pacer, stored.context, stored.costs
            guard = stored.conservative
            stored.pacer = stored.context = stored.costs = stored.conservative = None
            same = self.is_configured(stored)
            policy = (
                from_state(stored) if same else make_policy(self.policy_name, **self.policy_params)
            )
            self.context = self._reconciled_context(context, source)
            self.policy, self.pacer = policy, self._reconciled_pacer(pacer)
            self._give_layout()
            halflife = self._cost_halflife()
            self.costs = (
                CostEstimator(halflife)
                if costs is None
                else CostEstimator.from_dict(costs, halflife)
            )
            self.guard = self._reconciled_guard(guard)
            if not same and self.guard is not None:
                self.guard.forget_outcomes()  # the rebuild replays every reward into it
            self.watermark = watermark if same else 0
            self.decision_watermark = decision_watermark
            return same

    def is_configured(self, stored: PolicyState) -> bool:
        """Whether a stored policy is of the configured kind and parameters (its seed aside:
        it only drives the draws, reseeded at every start)."""
        if stored.kind != self.policy_name:
            return False
        fresh = make_policy(self.policy_name, **self.policy_params)
        return _comparable(fresh.checkpoint_state().params) == _comparable(stored.params)

    def guarded(
        self, task: str, choice: Choice, pricing: Pricing | None, base: RewardSettings
    ) -> Choice:
        """``choice``, or its task's baseline when conservative mode says the choice could
        break the task's budget (:mod:`service.policy.conservative`), priced at ``pricing``
        (None: the λ in force and the outcomes' mean costs)."""
        if self.guard is None:
            return choice
        if pricing is None:
            settings = self.reward_settings(base)
            pricing = Pricing(settings.lam, settings.cost_unit)
        return self.guard.guard(task, choice, pricing)

    def _reconciled_guard(self, saved: dict | None) -> ConservativeGuard | None:
        """A checkpoint's conservative budgets continue if their rules are the configured
        ones; otherwise the configured rules count from this checkpoint on (a log line says
        so)."""
        if not self.conservative:
            return None
        fresh = ConservativeGuard(self.conservative)
        if saved is not None and saved["rules"] == fresh.to_dict()["rules"]:
            return ConservativeGuard.from_dict(saved)
        log.info("conservative mode's rules changed: its budgets count from this checkpoint on")
        return fresh

    def _reconciled_pacer(self, saved: BudgetPacer | None) -> BudgetPacer | None:
        """A checkpoint's pacer continues, unless budget mode was switched off or its target
        changed since (then the configured pacer starts afresh)."""
        wanted = self.configured_pacer
        if wanted is None:
            if saved is not None:
                log.info("budget mode is off: the checkpoint's λ pacer is dropped")
            return None
        if saved is None or saved.target_cost_per_query != wanted.target_cost_per_query:
            return wanted
        return saved

    def _reconciled_context(self, saved: ContextBuilder | None, source: str) -> ContextBuilder:
        """A restored context builder, if its layout is the configured one."""
        wanted = self.configured_context
        spec = LEGACY if saved is None else saved.spec
        if spec != wanted.spec:
            raise ContextMismatch(_mismatch(source, spec, wanted.spec))
        if saved is None:  # a checkpoint from before layouts: its contexts are embeddings
            return copy.deepcopy(wanted)
        saved.declared = wanted.declared
        return saved


def _comparable(params: dict) -> dict:
    """Policy parameters as a checkpoint's JSON header holds them, without the seed."""
    out = json.loads(json.dumps(params))
    out.pop("seed", None)
    return out


class ContextMismatch(RuntimeError):
    """The stored policy learned from contexts of another layout than the configured one."""


def _mismatch(source: str, stored: str, configured: str) -> str:
    return (
        f"the stored policy ({source}) learned from contexts of layout {stored!r}, but the "
        f"service is configured for {configured!r}. Configure the same layout "
        "(METALLM_CONTEXT_EMBEDDING, METALLM_CONTEXT_TASK_BUCKETS, "
        "METALLM_CONTEXT_FEATURE_BUCKETS and the tasks' `features` in the config; "
        "METALLM_CONTEXT_EMBEDDING=legacy for a policy learned before layouts existed), or "
        "start a fresh policy in an empty database or schema"
    )
