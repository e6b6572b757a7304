"""The live policy and its durability: applies committed rewards in order, checkpoints, restores.

Rewards get a sequence number inside the database transaction that stores them, under the
same lock that then applies them to the in-memory policy, so the policy always equals
"checkpoint + every reward with seq > its watermark, in seq order". After a crash, restore
loads the newest checkpoint and re-applies exactly those rewards from Postgres.

The context builder's running statistics (``service.context``) and, in budget mode, λ (a
:class:`BudgetPacer`) are a projection of the decision log the same way: both are kept in the
policy's checkpoint, every stored decision is observed once in ``decision_seq`` order, and a
restart re-observes the decisions stored after the checkpoint.

A policy learns from contexts of one layout only: restoring a checkpoint (or replaying
rewards) of another layout than the configured one stops the start with
:class:`ContextMismatch`, rather than mixing vectors that mean different things.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterable

from sqlalchemy.engine import Engine

from service import metrics, storage
from service.context import LEGACY, ContextBuilder, ContextLayout
from service.pacing import BudgetPacer
from service.policy import RoutingPolicy, loads, make_policy
from service.reward import RewardSettings
from service.storage import AppliedReward, LoggedDecision

log = logging.getLogger(__name__)


def labels_match(prediction: str | None, label: str) -> bool:
    """A prediction is correct when it equals the label, ignoring case and surrounding space."""
    return prediction is not None and prediction.strip().casefold() == label.strip().casefold()


class LivePolicy:
    """The one policy of a running service, shared by the query and the label consumer."""

    def __init__(
        self,
        engine: Engine,
        policy_name: str,
        policy_params: dict,
        checkpoint_every: int = 100,
        budget: BudgetPacer | None = None,
        context: ContextBuilder | None = None,
    ) -> None:
        self.engine = engine
        self.policy_name = policy_name
        self.policy: RoutingPolicy = make_policy(policy_name, **policy_params)
        self.checkpoint_every = checkpoint_every
        self.budget = budget  # the pacer to start from in budget mode (None: fixed λ)
        self.policy.pacer = budget
        #: the configured context layout (a fresh builder): what a restored policy must match
        self.configured_context = context or ContextBuilder(ContextLayout())
        self.policy.context = copy.deepcopy(self.configured_context)
        self.lock = threading.RLock()
        self.watermark = 0  # highest reward_seq applied to self.policy
        self._held: list[AppliedReward] = []  # committed, waiting for a gap to be checked
        self.decision_watermark = 0  # highest decision_seq whose cost the pacer has seen
        self._since_checkpoint = 0

    def reward_settings(self, base: RewardSettings) -> RewardSettings:
        """The reward settings in force now: ``base``, with λ from the pacer in budget mode."""
        pacer = self.policy.pacer
        return base if pacer is None else RewardSettings(pacer.lam, base.cost_unit)

    @property
    def context(self) -> ContextBuilder:
        """The builder (with its running statistics) of the contexts the policy learns from."""
        return self.policy.context

    def observe_decisions(self, logged: Iterable[LoggedDecision]) -> None:
        """Feed committed decisions to the context builder and, in budget mode, the pacer:
        once each, in ``decision_seq`` order. As in :meth:`apply`, a gap below them may hide
        decisions committed although this process saw their COMMIT fail (or stored by a
        rolled-back batch: then there is nothing): they are looked up and observed first."""
        with self.lock:
            todo = {d.seq: d for d in logged if d.seq > self.decision_watermark}
            if todo and min(todo) > self.decision_watermark + 1:
                try:
                    with self.engine.connect() as conn:
                        found = storage.decision_log(conn, after=self.decision_watermark)
                    todo.update((d.seq, d) for d in found)
                except Exception:
                    log.warning("cannot look for unobserved decisions", exc_info=True)
            for seq in sorted(todo):
                d = todo[seq]
                if self.policy.pacer is not None:
                    self.policy.pacer.observe(d.cost_usd)
                self.context.observe(d.task, d.n_chars, d.metadata)
                self.decision_watermark = seq

    def restore(self) -> int:
        """Load the newest checkpoint and re-apply the rewards stored after it.
        Returns how many rewards were replayed."""
        with self.lock, self.engine.connect() as conn:
            checkpoint = storage.latest_checkpoint(conn)
            if checkpoint is not None:
                self.policy = loads(checkpoint["state"])
                self.watermark = int(checkpoint["reward_watermark"])
                self.decision_watermark = int(checkpoint["decision_watermark"])
                self._reconcile_budget()
                self._reconcile_context(f"checkpoint {checkpoint['id']}")
                log.info(
                    "restored policy checkpoint %s (%d updates, watermark %d)",
                    checkpoint["id"],
                    checkpoint["n_updates"],
                    self.watermark,
                )
            replay = storage.rewards_after(conn, self.watermark)
            other = sorted({r.layout for r in replay} - {self.context.spec})
            if other:
                raise ContextMismatch(
                    _mismatch(f"{len(replay)} stored rewards", other[0], self.context.spec)
                )
            logged = storage.decision_log(conn, after=self.decision_watermark)
        self.observe_decisions(logged)
        self.apply(replay)
        if replay:
            log.info("re-applied %d rewards recorded after the checkpoint", len(replay))
        return len(replay)

    def _reconcile_budget(self) -> None:
        """A checkpoint's pacer continues, unless budget mode was switched off or its target
        changed since (then the configured pacer starts afresh)."""
        saved, wanted = self.policy.pacer, self.budget
        if wanted is None:
            if saved is not None:
                log.info("budget mode is off: the checkpoint's λ pacer is dropped")
            self.policy.pacer = None
        elif saved is None or saved.target_cost_per_query != wanted.target_cost_per_query:
            self.policy.pacer = wanted

    def _reconcile_context(self, source: str) -> None:
        """Keep a restored policy's context builder if its layout is the configured one."""
        saved: ContextBuilder | None = self.policy.context
        wanted = self.configured_context
        spec = LEGACY if saved is None else saved.spec
        if spec != wanted.spec:
            raise ContextMismatch(_mismatch(source, spec, wanted.spec))
        if saved is None:  # a checkpoint from before layouts: its contexts are embeddings
            self.policy.context = copy.deepcopy(wanted)
        else:
            saved.declared = wanted.declared

    def apply(self, rewards: Iterable[AppliedReward]) -> None:
        """Apply rewards already committed to Postgres. Call with the lock held since commit.

        Every reward-storing transaction runs under this lock, so a reward sequence number
        below the first one given that was never applied here is either a rolled-back
        transaction (a gap) or one that committed although this process saw it fail (the
        connection died after COMMIT was sent; the retried batch then finds its work done).
        Such gaps are looked up in Postgres and applied first, so the policy never skips a
        stored reward. A checkpoint that fails is retried later: the rewards are in Postgres.
        """
        with self.lock:
            todo = {r.seq: r for r in [*self._held, *rewards] if r.seq > self.watermark}
            self._held = []
            if todo and min(todo) > self.watermark + 1:
                try:
                    with self.engine.connect() as conn:
                        committed = storage.rewards_after(conn, self.watermark)
                except Exception:
                    log.warning(
                        "cannot look for unapplied rewards below seq %d yet; holding %d rewards",
                        min(todo),
                        len(todo),
                        exc_info=True,
                    )
                    self._held = list(todo.values())
                    return
                missed = [r for r in committed if r.seq < min(todo)]
                if missed:
                    log.warning("applying %d committed rewards this process missed", len(missed))
                todo.update((r.seq, r) for r in missed)
            for seq in sorted(todo):
                r = todo[seq]
                if r.layout == self.context.spec:
                    self.policy.update(r.arm, r.context, r.reward)
                else:  # decided before a change of layout (restart refuses those it replays)
                    log.warning(
                        "reward %d of %s is on a context of layout %r, not %r: not learned",
                        r.seq,
                        r.query_id,
                        r.layout,
                        self.context.spec,
                    )
                metrics.REWARD.labels(r.arm).observe(r.reward)
                self.watermark = r.seq
                self._since_checkpoint += 1
            if self._since_checkpoint >= self.checkpoint_every:
                try:
                    self.checkpoint()
                except Exception:
                    log.exception("policy checkpoint failed; retrying after the next reward")

    def catch_up(self) -> int:
        """Apply every committed reward this process has not (and observe every stored
        decision): rewards held back during an outage, and the tail a lost COMMIT
        acknowledgement leaves when no later reward reveals the gap. The service runs it every
        few seconds and before its last checkpoint. Returns how many rewards it applied."""
        with self.lock:
            with self.engine.connect() as conn:
                missed = storage.rewards_after(conn, self.watermark)
                logged = storage.decision_log(conn, after=self.decision_watermark)
            self.observe_decisions(logged)
            before = self.policy.n_updates
            self.apply(missed)
            applied = self.policy.n_updates - before
        if applied:
            log.warning("applied %d committed rewards this process had missed", applied)
        return applied

    def checkpoint(self) -> None:
        with self.lock:
            state = self.policy.dumps()
            with self.engine.begin() as conn:
                storage.save_checkpoint(
                    conn,
                    self.policy_name,
                    self.policy.n_updates,
                    self.watermark,
                    state,
                    decision_watermark=self.decision_watermark,
                )
            self._since_checkpoint = 0
            log.info(
                "policy checkpoint saved (%d updates, watermark %d)",
                self.policy.n_updates,
                self.watermark,
            )

    def warm_start(self, records, contexts, lam: float, cost_unit: float) -> int:
        """Train a fresh policy with full information from an outcomes file (every arm learns
        its own reward on every record), then checkpoint it so the service starts from it.
        Refuses a database where the service has already learned something."""
        from service.policy.warm_start import warm_start

        with self.lock:
            if self.policy.n_updates or self.watermark or self.decision_watermark:
                raise WarmStartRefused(
                    "this database already has a learned policy (a checkpoint or rewards); "
                    "warm start is for a fresh one"
                )
            n = warm_start(self.policy, records, contexts, lam, cost_unit)
            self.checkpoint()
            return n


class WarmStartRefused(RuntimeError):
    pass


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
