"""The live policy: a projection of the learning log in Postgres, which every instance computes.

The learning log is two sequences on the ``decisions`` table: ``reward_seq`` (a reward and
the context it was earned on) and ``decision_seq`` (a decision's task, length, metadata and
cost). Every transaction that appends to either takes :func:`storage.lock_learning_log`
first, so both are numbered in commit order across every process on the database.

Invariant: ``policy == checkpoint + every reward with seq > its watermark, applied in seq
order`` — and the context builder's statistics and, in budget mode, λ (a
:class:`BudgetPacer`) are the same projection of the decision log. Any instance, its own
rewards or another's, applies each reward once, in seq order, so all instances converge to
the same statistics. Rewards an instance stored itself are applied at once when they follow
its watermark; otherwise (another instance appended meanwhile) the log is read from the
watermark. A :class:`LogFollower` thread reads what other instances append (LISTEN/NOTIFY,
a poll as the fallback). After a crash, restore loads the newest checkpoint and reads the
log after it.

One instance writes checkpoints: the one holding the ``checkpoints`` session lock
(:class:`storage.SessionLock`); when it dies, the next instance due to checkpoint takes over.
A checkpoint is due after ``checkpoint_every`` rewards and at least ``checkpoint_min_seconds``
after the previous one; in a service a :class:`Checkpointer` thread takes it (the policy's
lock is held only while its state is copied), so that applying rewards never waits for one
to be stored.
Each instance draws its exploration from a random generator of its own (:func:`instance_seed`),
recorded on each decision.

A policy learns from contexts of one layout only: restoring a checkpoint (or reading rewards)
of another layout than the configured one stops the start with :class:`ContextMismatch`,
rather than mixing vectors that mean different things.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import threading
import time
from collections.abc import Sequence

from sqlalchemy.engine import Connection, Engine

from service import metrics, storage
from service.context import LEGACY, ContextBuilder, ContextLayout
from service.decision import LoggedDecision
from service.pacing import BudgetPacer
from service.policy import RoutingPolicy, loads, make_policy
from service.reward import RewardSettings
from service.storage import AppliedReward

log = logging.getLogger(__name__)


def labels_match(prediction: str | None, label: str) -> bool:
    """A prediction is correct when it equals the label, ignoring case and surrounding space."""
    return prediction is not None and prediction.strip().casefold() == label.strip().casefold()


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


class LivePolicy:
    """The policy of a running service instance, shared by its query and label consumers."""

    def __init__(
        self,
        engine: Engine,
        policy_name: str,
        policy_params: dict,
        checkpoint_every: int = 100,
        budget: BudgetPacer | None = None,
        context: ContextBuilder | None = None,
        instance: str = "",
        draws_seed: int | None = None,
        checkpoint_min_seconds: float = 0.0,
    ) -> None:
        self.engine = engine
        self.policy_name = policy_name
        self.policy_params = dict(policy_params)
        self.policy: RoutingPolicy = make_policy(policy_name, **policy_params)
        self.checkpoint_every = checkpoint_every
        self.checkpoint_min_seconds = checkpoint_min_seconds
        self.configured_pacer = budget  # budget mode's pacer to start from (None: fixed λ)
        self.policy.pacer = budget
        #: the configured context layout (a fresh builder): what a restored policy must match
        self.configured_context = context or ContextBuilder(ContextLayout())
        self.policy.context = copy.deepcopy(self.configured_context)
        self.instance = instance
        self.draws_seed = draws_seed  # None: one of the instance's own (instance_seed)
        self.rng_seed: int | None = None  # set by restore()
        self.lock = threading.RLock()
        self.watermark = 0  # highest reward_seq applied to self.policy
        self.decision_watermark = 0  # highest decision_seq the builder and pacer have seen
        self._since_checkpoint = 0
        self._checkpointed_at = -math.inf  # time.monotonic() of the last checkpoint taken
        self._saving = threading.Lock()  # held while a checkpoint is taken and stored
        self.checkpointer: Checkpointer | None = None  # set: checkpoints off the caller's thread
        self.writer = storage.SessionLock(engine, "checkpoints")
        self._name = storage.SessionLock(engine, f"instance:{instance}")  # claim_instance
        self._claimed = self._name_lost = False

    def reward_settings(self, base: RewardSettings) -> RewardSettings:
        """The reward settings in force now: ``base``, with λ from the pacer in budget mode."""
        pacer = self.policy.pacer
        return base if pacer is None else RewardSettings(pacer.lam, base.cost_unit)

    @property
    def context(self) -> ContextBuilder:
        """The builder (with its running statistics) of the contexts the policy learns from."""
        return self.policy.context

    # ---------------------------------------------------------------- following the log
    def sync_decisions(self, conn: Connection) -> None:
        """Observe every decision logged after the watermark, in ``decision_seq`` order. Called
        inside a transaction holding the log's lock, λ is then that of the log so far: the
        same on every instance."""
        with self.lock:
            self._observe(storage.decision_log(conn, after=self.decision_watermark))

    def _observe(self, logged: Sequence[LoggedDecision]) -> None:
        for d in sorted(logged, key=lambda d: d.seq):
            if d.seq <= self.decision_watermark:
                continue
            if self.policy.pacer is not None:
                self.policy.pacer.observe(d.cost_usd)
            self.context.observe(d.task, d.n_chars, d.metadata)
            self.decision_watermark = d.seq

    def sync(self) -> int:
        """Apply every reward and observe every decision committed after the watermarks (this
        instance's and the others'). Returns how many rewards it applied."""
        with self.lock, self.engine.connect() as conn:
            self._observe(storage.decision_log(conn, after=self.decision_watermark))
            return self._apply(storage.rewards_after(conn, self.watermark))

    def stored(
        self,
        rewards: Sequence[AppliedReward],
        decisions: Sequence[LoggedDecision] = (),
        since: float | None = None,
    ) -> None:
        """Learn what this instance's transaction (started at monotonic ``since``) just
        committed: directly when it follows the watermarks, else by reading the log from them
        (another instance appended in between, or a transaction rolled back). If the log
        cannot be read now, the :class:`LogFollower` reads it later: it is all in Postgres."""
        with self.lock:
            if not _contiguous([d.seq for d in decisions], self.decision_watermark) or not (
                _contiguous([r.seq for r in rewards], self.watermark)
            ):
                try:
                    self.sync()
                except Exception:
                    log.warning("cannot read the learning log now; will catch up", exc_info=True)
                return
            self._observe(decisions)
            lag = None if since is None else time.monotonic() - since
            self._apply([r if lag is None else _aged(r, lag) for r in rewards])

    def _apply(self, rewards: Sequence[AppliedReward]) -> int:
        """Apply rewards read from the log (in seq order, none missing above the watermark)."""
        applied = 0
        for r in sorted(rewards, key=lambda r: r.seq):
            if r.seq <= self.watermark:
                continue
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
            if r.age_s is not None:
                metrics.LEARNING_LAG.observe(r.age_s)
            self.watermark = r.seq
            self._since_checkpoint += 1
            applied += 1
        if self.checkpoint_due():
            if self.checkpointer is not None:
                self.checkpointer.wake()
            else:
                try:
                    self.checkpoint()
                except Exception:
                    log.exception("policy checkpoint failed; retrying when the next one is due")
        return applied

    def checkpoint_due(self) -> bool:
        """Whether ``checkpoint_every`` rewards were applied since the last checkpoint, and
        ``checkpoint_min_seconds`` have passed since it."""
        return (
            self._since_checkpoint >= self.checkpoint_every
            and time.monotonic() - self._checkpointed_at >= self.checkpoint_min_seconds
        )

    def catch_up(self) -> int:
        """:meth:`sync`, logging what it found: run before the last checkpoint."""
        applied = self.sync()
        if applied:
            log.info("applied %d rewards from the learning log", applied)
        return applied

    # ---------------------------------------------------------------- durability
    def restore(self) -> int:
        """Load the newest checkpoint, read the log after it, and seed this instance's draws.
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
            self._observe(storage.decision_log(conn, after=self.decision_watermark))
            self._apply([_aged(r, None) for r in replay])
            self.rng_seed = self.draws_seed
            if self.rng_seed is None:
                seed = self.policy_params.get("seed")
                self.rng_seed = instance_seed(seed, self.instance, self.decision_watermark)
            self.policy.reseed(self.rng_seed)
        if replay:
            log.info("re-applied %d rewards recorded after the checkpoint", len(replay))
        return len(replay)

    def _reconcile_budget(self) -> None:
        """A checkpoint's pacer continues, unless budget mode was switched off or its target
        changed since (then the configured pacer starts afresh)."""
        saved, wanted = self.policy.pacer, self.configured_pacer
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

    def checkpoint(self, wait_s: float = 0.0) -> bool:
        """Save the policy, if this instance is the checkpoint writer (taking the role if no
        live instance has it). Returns whether it saved: not when another instance is the
        writer, nor when another thread of this one is saving a checkpoint and does not finish
        within ``wait_s`` (0: do not wait; a caller that waits must not hold :attr:`lock`).
        A failed save raises (and counts in ``metallm_checkpoint_failures_total``); a
        checkpoint is then due again once ``checkpoint_min_seconds`` have passed.

        The policy's lock is held only while its state and watermarks are copied, not while
        they are stored: on the :class:`Checkpointer`'s thread, rewards go on being applied
        meanwhile (a caller already holding the lock holds it through)."""
        if not self._saving.acquire(timeout=wait_s):  # timeout 0: does not wait
            if wait_s > 0:
                metrics.CHECKPOINT_FAILURES.inc()
                raise TimeoutError(f"a checkpoint being stored did not finish in {wait_s:g} s")
            return False  # that checkpoint is as good; the next one is due again later
        try:
            with self.lock:  # spaced by checkpoint_min_seconds, whether it is saved or not
                self._checkpointed_at = time.monotonic()
            writer = self.writer.try_acquire()  # a query on its own connection: not under lock
            metrics.CHECKPOINT_WRITER.set(1 if writer else 0)
            with self.lock:
                self._since_checkpoint = 0
                if not writer:
                    return False
                state = self.policy.dumps()
                n_updates, watermark = self.policy.n_updates, self.watermark
                decision_watermark = self.decision_watermark
            with self.engine.begin() as conn:
                storage.save_checkpoint(
                    conn,
                    self.policy_name,
                    n_updates,
                    watermark,
                    state,
                    decision_watermark=decision_watermark,
                )
        except Exception:
            metrics.CHECKPOINT_FAILURES.inc()
            with self.lock:  # due again once checkpoint_min_seconds have passed
                self._since_checkpoint = max(self._since_checkpoint, self.checkpoint_every)
            raise
        finally:
            self._saving.release()
        log.info("policy checkpoint saved (%d updates, watermark %d)", n_updates, watermark)
        return True

    def claim_instance(self) -> None:
        """Take this instance's name on the database for as long as it runs, or raise
        :class:`InstanceNameTaken`: two live instances of one name would each skip the
        other's notifications of the learning log (and draw from alike seeds)."""
        self._claimed = True
        if not self._name.try_acquire():
            self._claimed = False
            raise InstanceNameTaken(
                f"another metallm instance is running as {self.instance!r} on this database "
                "and schema: "
                "give each instance a METALLM_INSTANCE_ID of its own (the default, host name "
                "and process id, is)"
            )

    def keep_name(self) -> None:
        """Hold the claimed name again if its session ended (a Postgres restart), logging once
        if another instance took it meanwhile (:class:`LogFollower` calls it every poll)."""
        if not self._claimed:
            return
        held = self._name.try_acquire()
        if not held and not self._name_lost:
            log.error(
                "another metallm instance now runs as %r on this database and schema (this one "
                "lost the name when its Postgres session ended): give each instance a "
                "METALLM_INSTANCE_ID of its own",
                self.instance,
            )
        self._name_lost = not held

    def close(self) -> None:
        """Give up the checkpoint writer's role (another instance takes it) and the name."""
        self.writer.release()
        self._name.release()
        self._claimed = False
        metrics.CHECKPOINT_WRITER.set(0)

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
            if not self.checkpoint():
                raise WarmStartRefused(
                    "another metallm instance is running on this database (it holds the "
                    "checkpoint writer's lock); stop it to warm start"
                )
            return n


class WarmStartRefused(RuntimeError):
    pass


class InstanceNameTaken(RuntimeError):
    """Another live instance on the database has this instance's name."""


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


def _aged(r: AppliedReward, age_s: float | None) -> AppliedReward:
    return AppliedReward(r.seq, r.query_id, r.arm, r.context, r.reward, r.layout, age_s)


class LogFollower:
    """Keeps a :class:`LivePolicy` up with what other instances append to the learning log:
    wakes on their NOTIFY (or every ``poll_s`` regardless) and syncs."""

    def __init__(self, live: LivePolicy, poll_s: float = 1.0) -> None:
        self.live = live
        self.poll_s = poll_s
        # its own appends it applies itself (LivePolicy.stored): woken by them, it took the
        # policy's lock from the consumer that had just stored them (benchmarks/scale_out.py)
        self.listener = storage.LogListener(live.engine, ignore=live.instance or None)
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            try:  # a listener that cannot LISTEN (Postgres away) leaves the poll to sync
                self.listener.wait(self.poll_s)
            except Exception:
                if self.stop_event.is_set():  # stop closed the listener under the wait
                    break
                log.debug("listening for the learning log failed; polling", exc_info=True)
                self.stop_event.wait(self.poll_s)
            try:
                self.live.sync()
                self.live.keep_name()
                failures = 0
            except Exception:
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "following the learning log failed; retrying", exc_info=True)
                self.stop_event.wait(min(self.poll_s * 2**failures, 30.0))

    def start(self) -> LogFollower:
        self._thread = threading.Thread(target=self.run, name="metallm-log-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.listener.shutdown()  # ends a wait in progress
        if self._thread is not None:
            self._thread.join(30)


class Checkpointer:
    """Takes a :class:`LivePolicy`'s checkpoints on a thread of its own, so that the thread
    applying rewards does not wait while a checkpoint of several MB is stored: woken when
    one is due (:meth:`LivePolicy.checkpoint_due`), and every ``checkpoint_min_seconds`` (at
    least every second) to see whether one became due meanwhile (after a failed one, say)."""

    def __init__(self, live: LivePolicy) -> None:
        self.live = live
        self._wake = threading.Event()
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self._wake.wait(max(self.live.checkpoint_min_seconds, 1.0))
            self._wake.clear()
            if self.stop_event.is_set() or not self.live.checkpoint_due():
                continue
            try:
                self.live.checkpoint()
            except Exception:
                log.exception(
                    "policy checkpoint failed; retrying in %g s",
                    max(self.live.checkpoint_min_seconds, 1.0),
                )

    def start(self) -> Checkpointer:
        self.live.checkpointer = self
        self._thread = threading.Thread(target=self.run, name="metallm-checkpoints", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop, after the checkpoint being stored (if any, for up to ``timeout_s``; the final
        checkpoint then waits for it: ``checkpoint(wait_s=…)``). The policy checkpoints on
        the caller's thread again."""
        self.stop_event.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.live.checkpointer = None
