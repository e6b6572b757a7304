"""The learning log: its lock, reading it, and the one transaction that appends to it.

Deciding and learning both append through :meth:`LearningLog.append`: take the log's lock,
catch the live policy up with the decision log (so λ is the log's, whichever instance
appends), write, commit, and hand what was committed to the live policy. A policy then follows
the log (:mod:`service.learning`): its own appends at once when they follow its watermarks,
else by reading the log from them.

Invariant 1, Postgres orders learning, is held here: stated at :func:`lock_learning_log`,
the one lock every append takes. No LLM call runs under it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from service.decision import LoggedDecision, cost_unknown
from service.learning import LivePolicy, instance_seed
from service.log.checkpoints import CheckpointWriter, latest_checkpoint
from service.log.rows import AppliedReward, bytes_to_vector, learned_outcome
from service.log.session import InstanceName
from service.reward import RewardSettings
from service.storage import decisions

log = logging.getLogger(__name__)

#: NOTIFY channel (with the schema's name after it) that a learning-log append wakes
LOG_CHANNEL_PREFIX = "metallm_log_"


def lock_learning_log(conn: Connection, sender: str = "") -> None:
    """Take the learning log's lock for the rest of this transaction, and wake the other
    instances when it commits.

    Invariant: every transaction that gives out ``reward_seq`` or ``decision_seq`` values (or
    joins labels to decisions) takes this lock first, and holds it until COMMIT or ROLLBACK.
    So sequence numbers are given out in commit order across every process on the database:
    once a reader sees seq ``n`` committed, every seq below ``n`` is committed (and visible)
    or rolled back for good, and a reader can move its watermark to ``n``. It also makes the
    label ↔ decision join safe: a label and its decision stored at once by two instances are
    never both stored without seeing each other. The lock is one per schema (a
    transaction-level advisory lock); hold it only for database work, never for an LLM call.

    The notification's payload is ``sender`` (the instance's id): an instance's own
    :class:`~service.log.follower.LogListener` ignores its own appends, which the instance
    applies itself.
    """
    conn.execute(
        sa.text(
            "SELECT pg_advisory_xact_lock(hashtextextended('metallm-log:' || current_schema(), 0)),"
            " pg_notify(:prefix || current_schema(), :sender)"
        ),
        {"prefix": LOG_CHANNEL_PREFIX, "sender": sender},
    )


def decision_log(conn: Connection, after: int) -> list[LoggedDecision]:
    """Every decision after a ``decision_seq`` watermark, in order (see :class:`LoggedDecision`)."""
    stmt = (
        sa.select(
            decisions.c.decision_seq,
            decisions.c.cost_usd,
            decisions.c.task,
            sa.func.char_length(decisions.c.text),
            decisions.c.metadata,
            decisions.c.arm,
            decisions.c.output_tokens,
            decisions.c.status,
            decisions.c.fallback_arm,
        )
        .where(decisions.c.decision_seq > after)
        .order_by(decisions.c.decision_seq)
    )
    return [
        LoggedDecision(
            int(seq), float(cost), task, int(n or 0), meta, arm, out, cost_unknown(status, fb)
        )
        for seq, cost, task, n, meta, arm, out, status, fb in conn.execute(stmt)
    ]


def rewards_after(conn: Connection, watermark: int) -> list[AppliedReward]:
    """Rewards committed after a watermark, in ``reward_seq`` order: the order every instance
    applies them in (see :func:`lock_learning_log`)."""
    rows = conn.execute(
        sa.select(
            decisions.c.reward_seq,
            decisions.c.query_id,
            decisions.c.arm,
            decisions.c.context,
            decisions.c.reward,
            decisions.c.context_layout,
            sa.func.extract("epoch", sa.func.clock_timestamp() - decisions.c.reward_applied_at),
            decisions.c.correct,
            decisions.c.cost_usd,
            decisions.c.status,
            decisions.c.fallback_arm,
            decisions.c.score,
            decisions.c.propensity,
            decisions.c.decision_lambda,
            decisions.c.task,
        )
        .where(decisions.c.reward_seq > watermark)
        .order_by(decisions.c.reward_seq)
    )
    return [
        AppliedReward(
            seq,
            qid,
            arm,
            bytes_to_vector(ctx),
            r,
            layout,
            float(age or 0.0),
            *learned_outcome(correct, cost, status, fb, score),
            propensity=p,
            lam=lam,
            task=task,
        )
        for (
            seq,
            qid,
            arm,
            ctx,
            r,
            layout,
            age,
            correct,
            cost,
            status,
            fb,
            score,
            p,
            lam,
            task,
        ) in rows
    ]


def last_reward_seq(conn: Connection) -> int:
    """The highest reward sequence number committed (0: none yet)."""
    return int(conn.execute(sa.select(sa.func.max(decisions.c.reward_seq))).scalar() or 0)


def _catch_up_costs(conn: Connection, live: LivePolicy) -> None:
    """Bring cost estimates that lag the decision watermark (a checkpoint from before they
    were kept) up to it, from the decision log."""
    if live.costs.watermark < live.decision_watermark:
        logged = decision_log(conn, after=live.costs.watermark)
        live.observe_costs([d for d in logged if d.seq <= live.decision_watermark])


@dataclass
class Append:
    """One append transaction in progress: its connection, the reward settings in force (λ
    read under the lock), and what it committed for the live policy to learn."""

    conn: Connection
    rewards: RewardSettings
    applied: list[AppliedReward] = field(default_factory=list)
    logged: list[LoggedDecision] = field(default_factory=list)


class LearningLog:
    """One instance's side of the learning log: the appends it makes, and its live policy kept
    up with the log (restored from a checkpoint, then following every append)."""

    def __init__(
        self,
        engine: Engine,
        live: LivePolicy,
        instance: str = "",
        checkpoint_every: int = 100,
        checkpoint_min_seconds: float = 0.0,
        draws_seed: int | None = None,
    ) -> None:
        self.engine = engine
        self.live = live
        self.instance = instance
        self.draws_seed = draws_seed  # None: one of the instance's own (instance_seed)
        self.rng_seed: int | None = None  # set by restore()
        self.checkpoints = CheckpointWriter(engine, live, checkpoint_every, checkpoint_min_seconds)
        self.name = InstanceName(engine, instance)

    @contextmanager
    def append(self, base: RewardSettings) -> Iterator[Append]:
        """A transaction appending to the log: locked, the decision log caught up, λ read;
        what it records in :attr:`Append.applied` and :attr:`Append.logged` is learned once it
        commits."""
        started = time.monotonic()
        with self.engine.begin() as conn:
            lock_learning_log(conn, self.instance)  # numbers the appends in commit order
            self.sync_decisions(conn)
            tx = Append(conn, self.live.reward_settings(base))
            yield tx
        self.stored(tx.applied, tx.logged, since=started)

    def sync_decisions(self, conn: Connection) -> None:
        """Observe every decision logged after the watermark. Called inside a transaction
        holding the log's lock, λ is then that of the log so far: the same on every instance."""
        with self.live.lock:
            self.live.observe(decision_log(conn, after=self.live.decision_watermark))

    def sync(self) -> int:
        """Apply every reward and observe every decision committed after the watermarks (this
        instance's and the others'). Returns how many rewards it applied."""
        with self.live.lock, self.engine.connect() as conn:
            self.live.observe(decision_log(conn, after=self.live.decision_watermark))
            return self._apply(rewards_after(conn, self.live.watermark))

    def stored(
        self,
        rewards: Sequence[AppliedReward],
        decisions: Sequence[LoggedDecision] = (),
        since: float | None = None,
    ) -> None:
        """Learn what this instance's transaction (started at monotonic ``since``) just
        committed: directly when it follows the watermarks, else by reading the log from them
        (another instance appended in between, or a transaction rolled back). If the log
        cannot be read now, the log follower reads it later: it is all in Postgres."""
        with self.live.lock:
            if not self.live.follows(rewards, decisions):
                try:
                    self.sync()
                except Exception:
                    log.warning("cannot read the learning log now; will catch up", exc_info=True)
                return
            self.live.observe(decisions)
            lag = None if since is None else time.monotonic() - since
            self._apply([r if lag is None else r.aged(lag) for r in rewards])

    def _apply(self, rewards: Sequence[AppliedReward]) -> int:
        applied = self.live.apply(rewards)
        self.checkpoints.applied(applied)
        return applied

    def catch_up(self) -> int:
        """:meth:`sync`, logging what it found: run before the last checkpoint."""
        applied = self.sync()
        if applied:
            log.info("applied %d rewards from the learning log", applied)
        return applied

    def restore(self) -> int:
        """Load the newest checkpoint, read the log after it, and seed this instance's draws.
        Returns how many rewards were replayed."""
        live = self.live
        with live.lock, self.engine.connect() as conn:
            checkpoint = latest_checkpoint(conn)
            rebuild = False
            if checkpoint is not None:
                rebuild = not live.load(
                    checkpoint.state,
                    checkpoint.reward_watermark,
                    checkpoint.decision_watermark,
                    f"checkpoint {checkpoint.id}",
                )
                log.info(
                    "restored policy checkpoint %s (%d updates, watermark %d)",
                    checkpoint.id,
                    checkpoint.n_updates,
                    checkpoint.reward_watermark,
                )
                if rebuild:
                    log.warning(
                        "the configured policy (%s %s) is not the stored one (%s): rebuilding "
                        "it from the %d rewards of the learning log",
                        live.policy_name,
                        json.dumps(live.policy_params, sort_keys=True),
                        checkpoint.policy,
                        last_reward_seq(conn),
                    )
                _catch_up_costs(conn, live)
            replay = rewards_after(conn, live.watermark)
            if not rebuild:  # a rebuild skips (with a warning) rewards of older layouts
                live.check_replay(replay)
            live.observe(decision_log(conn, after=live.decision_watermark))
            self._apply([r.aged(None) for r in replay])
            self.rng_seed = self.draws_seed
            if self.rng_seed is None:
                seed = live.policy_params.get("seed")
                self.rng_seed = instance_seed(seed, self.instance, live.decision_watermark)
            live.policy.reseed(self.rng_seed)
        if replay:
            since = "in the log" if rebuild else "recorded after the checkpoint"
            log.info("re-applied %d rewards %s", len(replay), since)
        return len(replay)

    def close(self) -> None:
        """Give up the checkpoint writer's role (another instance takes it) and the name."""
        self.checkpoints.release()
        self.name.release()
