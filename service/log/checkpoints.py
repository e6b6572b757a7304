"""Checkpoints of the live policy: one writer (the instance holding the ``checkpoints``
session lock) stores them, any instance restores from the newest.

Invariant: one checkpoint writer. Checkpoints are written (and pruned) only by the instance
holding that session-level advisory lock; any instance can restore from any checkpoint, since
all compute the same projection of the log. A checkpoint is the policy's state, the context
builder's and the pacer's, and both watermarks, copied together under the policy's lock, then
stored after that lock is released, one at a time.

A checkpoint is due after ``every`` rewards and at least ``min_seconds`` after the previous
one; in a service a :class:`Checkpointer` thread takes it (the policy's lock is held only
while its state is copied), so that applying rewards never waits for one to be stored.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from service import metrics
from service.learning import LivePolicy, Snapshot
from service.log.rows import StoredCheckpoint
from service.log.session import SessionLock
from service.storage import policy_checkpoints

log = logging.getLogger(__name__)


def save_checkpoint(conn: Connection, snapshot: Snapshot, keep: int = 3) -> None:
    """Store a policy checkpoint and prune all but the newest ``keep``."""
    conn.execute(
        sa.insert(policy_checkpoints).values(
            policy=snapshot.policy,
            n_updates=snapshot.n_updates,
            reward_watermark=snapshot.watermark,
            decision_watermark=snapshot.decision_watermark,
            state=snapshot.state,
        )
    )
    newest = (
        sa.select(policy_checkpoints.c.id)
        .order_by(policy_checkpoints.c.id.desc())
        .limit(keep)
        .scalar_subquery()
    )
    conn.execute(sa.delete(policy_checkpoints).where(policy_checkpoints.c.id.not_in(newest)))


def latest_checkpoint(conn: Connection) -> StoredCheckpoint | None:
    c = policy_checkpoints.c
    row = conn.execute(
        sa.select(
            c.id,
            c.created_at,
            c.policy,
            c.n_updates,
            c.reward_watermark,
            c.decision_watermark,
            c.state,
        )
        .order_by(c.id.desc())
        .limit(1)
    ).first()
    return None if row is None else StoredCheckpoint(*row)


class WarmStartRefused(RuntimeError):
    pass


class CheckpointWriter:
    """Stores a :class:`LivePolicy`'s checkpoints when they are due, if this instance is the
    checkpoint writer (taking the role if no live instance has it)."""

    def __init__(
        self, engine: Engine, live: LivePolicy, every: int = 100, min_seconds: float = 0.0
    ) -> None:
        self.engine = engine
        self.live = live
        self.every = every
        self.min_seconds = min_seconds
        self.role = SessionLock(engine, "checkpoints")
        self.thread: Checkpointer | None = None  # set: checkpoints off the caller's thread
        self._since = 0  # rewards applied since the last checkpoint
        self._taken_at = -math.inf  # time.monotonic() of the last checkpoint taken
        self._saving = threading.Lock()  # held while a checkpoint is taken and stored

    def applied(self, n: int) -> None:
        """Count ``n`` rewards applied; take a checkpoint if one is due (on the thread, if
        there is one)."""
        self._since += n
        if not self.due():
            return
        if self.thread is not None:
            self.thread.wake()
            return
        try:
            self.save()
        except Exception:
            log.exception("policy checkpoint failed; retrying when the next one is due")

    def due(self) -> bool:
        """Whether ``every`` rewards were applied since the last checkpoint, and
        ``min_seconds`` have passed since it."""
        return self._since >= self.every and time.monotonic() - self._taken_at >= self.min_seconds

    def save(self, wait_s: float = 0.0) -> bool:
        """Save the policy, if this instance is the checkpoint writer. Returns whether it
        saved: not when another instance is the writer, nor when another thread of this one is
        saving a checkpoint and does not finish within ``wait_s`` (0: do not wait; a caller
        that waits must not hold the policy's lock). A failed save raises (and counts in
        ``metallm_checkpoint_failures_total``); a checkpoint is then due again once
        ``min_seconds`` have passed.

        The policy's lock is held only while its state and watermarks are copied, not while
        they are stored: on the :class:`Checkpointer`'s thread, rewards go on being applied
        meanwhile (a caller already holding the lock holds it through)."""
        if not self._saving.acquire(timeout=wait_s):  # timeout 0: does not wait
            if wait_s > 0:
                metrics.CHECKPOINT_FAILURES.inc()
                raise TimeoutError(f"a checkpoint being stored did not finish in {wait_s:g} s")
            return False  # that checkpoint is as good; the next one is due again later
        try:
            with self.live.lock:  # spaced by min_seconds, whether it is saved or not
                self._taken_at = time.monotonic()
            writer = self.role.try_acquire()  # a query on its own connection: not under lock
            metrics.CHECKPOINT_WRITER.set(1 if writer else 0)
            with self.live.lock:
                self._since = 0
                if not writer:
                    return False
                snapshot = self.live.snapshot()
            with self.engine.begin() as conn:
                save_checkpoint(conn, snapshot)
        except Exception:
            metrics.CHECKPOINT_FAILURES.inc()
            with self.live.lock:  # due again once min_seconds have passed
                self._since = max(self._since, self.every)
            raise
        finally:
            self._saving.release()
        log.info(
            "policy checkpoint saved (%d updates, watermark %d)",
            snapshot.n_updates,
            snapshot.watermark,
        )
        return True

    def check_fresh(self) -> None:
        """Raise :class:`WarmStartRefused` unless the restored policy learned nothing yet (no
        checkpoint, reward or decision in the log): what a warm start needs, checked before
        the outcomes file is embedded, and again when it is learnt."""
        live = self.live
        if live.policy.n_updates or live.watermark or live.decision_watermark:
            raise WarmStartRefused(
                "this database already has a learned policy (a checkpoint or rewards); "
                "warm start is for a fresh one"
            )

    def warm_start(self, records, contexts, lam: float, cost_unit: float) -> int:
        """Train a fresh policy with full information from an outcomes file (every arm learns
        its own reward on every record), then checkpoint it so the service starts from it.
        Refuses a database where the service has already learned something."""
        from service.policy.warm_start import warm_start

        live = self.live
        with live.lock:
            self.check_fresh()
            n = warm_start(live.policy, records, contexts, lam, cost_unit)
            if not self.save():
                raise WarmStartRefused(
                    "another metallm instance is running on this database (it holds the "
                    "checkpoint writer's lock); stop it to warm start"
                )
            return n

    def release(self) -> None:
        """Give up the checkpoint writer's role (another instance takes it)."""
        self.role.release()
        metrics.CHECKPOINT_WRITER.set(0)


class Checkpointer:
    """Takes a :class:`CheckpointWriter`'s checkpoints on a thread of its own, so that the
    thread applying rewards does not wait while a checkpoint of several MB is stored: woken
    when one is due, and every ``min_seconds`` (at least every second) to see whether one
    became due meanwhile (after a failed one, say)."""

    def __init__(self, writer: CheckpointWriter) -> None:
        self.writer = writer
        self._wake = threading.Event()
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        every = max(self.writer.min_seconds, 1.0)
        while not self.stop_event.is_set():
            self._wake.wait(every)
            self._wake.clear()
            if self.stop_event.is_set() or not self.writer.due():
                continue
            try:
                self.writer.save()
            except Exception:
                log.exception("policy checkpoint failed; retrying in %g s", every)

    def start(self) -> Checkpointer:
        self.writer.thread = self
        self._thread = threading.Thread(target=self.run, name="metallm-checkpoints", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop, after the checkpoint being stored (if any, for up to ``timeout_s``; the final
        checkpoint then waits for it: ``save(wait_s=…)``). The policy checkpoints on the
        caller's thread again."""
        self.stop_event.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.writer.thread = None
