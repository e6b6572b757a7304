"""Two instances on one database, against the real Postgres: the races that a second writer
opens, each held open on purpose (a row lock taken by the test pauses one transaction at a
chosen statement), and the roles only one instance may have.

Each instance is what ``metallm serve`` builds: a :class:`LearningLog` (and its live policy)
with its :class:`Learner` (and :class:`Decider`) on an engine of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import sqlalchemy as sa

from service import storage
from service.events import LabelEvent, QueryEvent
from service.llm.gateway import Gateway
from service.log import labels as label_sql
from service.log import session, transaction
from service.log.checkpoints import Checkpointer
from service.log.follower import LogFollower, LogListener
from service.log.transaction import LearningLog
from service.pipeline import Decider, Learner, QueryRecord, RewardSettings
from tests.conftest import wait_for
from tests.faults.harness import HashEmbedder, policy_difference, rebuild_policy
from tests.helpers import (
    ARMS,
    demo_rows,
    legacy_context,
    open_learning_log,
    replay_config,
    write_outcomes,
)
from tests.test_labels import insert_decision

pytestmark = pytest.mark.integration

REWARDS = RewardSettings(lam=0.1, cost_unit=0.001)


@pytest.fixture
def instances(engine) -> Iterator[Callable[..., LearningLog]]:
    """Make instances (each a LearningLog on an engine of its own), closed afterwards."""
    made: list[tuple[LearningLog, sa.Engine]] = []

    def make(name: str, **kwargs) -> LearningLog:
        live = open_learning_log(
            _same_schema(engine),
            "linucb",
            {"seed": 0, **kwargs.pop("params", {})},
            context=kwargs.pop("context", legacy_context()),
            instance=name,
            **kwargs,
        )
        made.append((live, live.engine))
        return live

    yield make
    for live, e in made:
        live.close()
        e.dispose()


def _same_schema(engine: sa.Engine) -> sa.Engine:
    """A second engine (a pool of its own, as another process has) on the test's schema."""
    with engine.connect() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    return storage.make_engine(engine.url.render_as_string(hide_password=False), schema)


@contextmanager
def row_locked(engine: sa.Engine, sql: str) -> Iterator[None]:
    """Hold the row lock ``sql`` (a SELECT … FOR UPDATE) until the block ends."""
    with engine.connect() as conn, conn.begin():
        assert conn.execute(sa.text(sql)).first() is not None
        yield


def waiting_backends(engine: sa.Engine, table: str | None = None) -> int:
    """Backends of this database waiting for a lock (on ``table`` of the test's schema, if
    given)."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE NOT l.granted AND a.datname = current_database() "
                "AND (CAST(:t AS text) IS NULL OR l.relation = to_regclass(:t))"
            ),
            {"t": table},
        ).scalar_one()


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # reported by the test
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def labels(*pairs: tuple[str, str]) -> list[LabelEvent]:
    return [LabelEvent(query_id=q, label=label) for q, label in pairs]


def test_a_reward_committed_after_a_later_one_is_still_applied_by_every_instance(engine, instances):
    """Instance A gives out reward seq 1 and pauses before COMMIT (its duplicate counter
    waits for a row the test holds); instance B stores the next reward meanwhile. B must not
    move past seq 1 while it is uncommitted: when A commits, both policies hold both rewards,
    equal to a policy rebuilt from the log. (Numbering rewards outside one lock let B commit
    seq 2 first, apply it, and skip seq 1 for ever.)"""
    for q in ("q1", "q2"):
        insert_decision(engine, q)
    with engine.begin() as conn:
        label_sql.bump_counter(conn, "duplicate_labels", 0)
    a, b = instances("a"), instances("b")
    learn_a = Learner(a, REWARDS, pending_ttl_seconds=3600)
    learn_b = Learner(b, REWARDS, pending_ttl_seconds=3600)
    with row_locked(engine, "SELECT * FROM service_counters FOR UPDATE"):
        thread_a, _ = in_thread(lambda: learn_a.learn(labels(("q1", "a"), ("q1", "a"))))
        wait_for(lambda: waiting_backends(engine) >= 1, 10, message="A paused before COMMIT")
        thread_b, done_b = in_thread(lambda: learn_b.learn(labels(("q2", "a"))))
        wait_for(lambda: done_b or waiting_backends(engine) >= 2, 10, message="B stored or waiting")
        b.catch_up()  # what B can see of the log while A is still open
    thread_a.join(10)
    thread_b.join(10)
    assert not thread_a.is_alive() and not thread_b.is_alive()
    for live in (a, b):
        live.catch_up()
    expected = rebuild_policy(engine, "linucb", {"seed": 0})
    for live in (a, b):
        assert live.live.policy.n_updates == 2
        assert policy_difference(live.live.policy, expected) < 1e-9


def test_a_label_and_its_decision_stored_at_once_by_two_instances_meet(engine, instances, tmp_path):
    """Instance B keeps an early label for q and pauses before COMMIT; instance A stores q's
    decision meanwhile. Joined under one lock, A's transaction sees the label once B commits
    and applies it; no label is left waiting beside its decision. (Under READ COMMITTED
    without the lock, each missed the other: the label sat in pending_labels until the TTL.)"""
    rows = demo_rows(1)
    q = rows[0]["query_id"]
    config = replay_config(write_outcomes(tmp_path / "o.jsonl", rows, ARMS), list(ARMS))
    with engine.begin() as conn:
        label_sql.bump_counter(conn, "duplicate_labels", 0)
    a, b = instances("a"), instances("b")
    decider = Decider(config, a, HashEmbedder(), Gateway(config), REWARDS)
    learner = Learner(b, REWARDS, pending_ttl_seconds=3600)
    label = rows[0]["label"]
    event = QueryEvent(query_id=q, text=rows[0]["text"], task=rows[0]["task"])
    try:
        with row_locked(engine, "SELECT * FROM service_counters FOR UPDATE"):
            # a label and its duplicate: kept, then counted, and the count waits for the test
            thread_b, _ = in_thread(lambda: learner.learn(labels((q, label), (q, label))))
            wait_for(lambda: waiting_backends(engine) >= 1, 10, message="B paused")
            thread_a, done_a = in_thread(lambda: decider.decide([QueryRecord(event)]))
            wait_for(
                lambda: done_a or waiting_backends(engine) >= 2, 30, message="A stored or waiting"
            )
        thread_a.join(30)
        thread_b.join(10)
        assert not thread_a.is_alive() and not thread_b.is_alive()
    finally:
        decider.close()
    with engine.connect() as conn:
        left = conn.execute(sa.text("SELECT count(*) FROM pending_labels")).scalar_one()
        stored = conn.execute(
            sa.text("SELECT label, duplicate_labels, reward_seq FROM decisions")
        ).one()
    assert left == 0
    assert stored.label == label and stored.duplicate_labels == 1 and stored.reward_seq == 1


def test_one_instance_writes_checkpoints_and_another_takes_over_when_it_stops(engine, instances):
    insert_decision(engine, "q1")
    a, b = instances("a"), instances("b")
    Learner(a, REWARDS, 3600).learn(labels(("q1", "a")))
    b.catch_up()
    assert a.checkpoints.save() is True
    assert b.checkpoints.save() is False  # a holds the writer's lock: b only restores
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM policy_checkpoints")).scalar_one() == 1
    a.close()  # as a stopped (or killed) instance's connection closes
    # b takes the writer's lock once a's backend has ended (Postgres ends it just after the
    # connection closes: on a loaded machine, not always before the next statement)
    wait_for(lambda: b.checkpoints.save(), 10, message="b writing checkpoints")
    restored = instances("c")
    restored.restore()
    assert restored.live.watermark == 1
    assert policy_difference(restored.live.policy, b.live.policy) < 1e-9


def checkpoints(engine: sa.Engine) -> list[int]:
    """The reward watermarks of the stored checkpoints, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT reward_watermark FROM policy_checkpoints ORDER BY id"))
        return [r[0] for r in rows]


def test_rewards_are_applied_while_a_checkpoint_is_being_stored(engine, instances):
    """With a Checkpointer, the thread that applies rewards never waits for a checkpoint to
    be stored: the test locks the checkpoint table, so that the checkpoint due after 2
    rewards cannot be written, and the learner goes on applying rewards; once the table is
    free the checkpoint lands, holding the rewards applied before it was taken."""
    for q in ("q1", "q2", "q3", "q4"):
        insert_decision(engine, q)
    live = instances("a", checkpoint_every=2)
    learner = Learner(live, REWARDS, 3600)
    checkpointer = Checkpointer(live.checkpoints).start()
    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(sa.text("LOCK TABLE policy_checkpoints IN ACCESS EXCLUSIVE MODE"))
            for batch in (("q1", "q2"), ("q3", "q4")):  # a checkpoint is due after the first
                thread, done = in_thread(
                    lambda b=batch: learner.learn(labels(*[(q, "a") for q in b]))
                )
                thread.join(10)
                assert done and not isinstance(done[0], BaseException), done
                wait_for(
                    lambda: waiting_backends(engine, "policy_checkpoints") >= 1,
                    10,
                    message="the checkpoint waiting for the table",
                )
            assert live.live.watermark == 4  # applied while the checkpoint still waits
        wait_for(lambda: checkpoints(engine), 10, message="the checkpoint stored")
        assert checkpoints(engine)[0] == 2
    finally:
        checkpointer.stop()


def test_checkpoints_are_spaced_by_checkpoint_min_seconds(engine, instances):
    """Due after every reward, but at most one per 60 s: one checkpoint for four rewards."""
    for q in ("q1", "q2", "q3", "q4"):
        insert_decision(engine, q)
    live = instances("a", checkpoint_every=1, checkpoint_min_seconds=60)
    learner = Learner(live, REWARDS, 3600)
    for q in ("q1", "q2", "q3", "q4"):
        learner.learn(labels((q, "a")))
    assert checkpoints(engine) == [1]
    assert not live.checkpoints.due()
    assert live.checkpoints.save() is True  # asked for (as at shutdown): taken at once
    assert checkpoints(engine) == [1, 4]


def test_a_checkpoint_that_cannot_be_stored_is_counted_and_due_again(engine, instances):
    """The checkpoint table renamed away: the save fails, counts in
    metallm_checkpoint_failures_total, and the checkpoint stays due; with the table back the
    next one holds every reward."""
    from prometheus_client import REGISTRY

    def failures() -> float:
        return REGISTRY.get_sample_value("metallm_checkpoint_failures_total") or 0.0

    insert_decision(engine, "q1")
    live = instances("a", checkpoint_every=1000)
    Learner(live, REWARDS, 3600).learn(labels(("q1", "a")))
    before = failures()
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE policy_checkpoints RENAME TO checkpoints_away"))
    try:
        with pytest.raises(sa.exc.ProgrammingError):
            live.checkpoints.save()
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE checkpoints_away RENAME TO policy_checkpoints"))
    assert failures() == before + 1
    assert live.checkpoints.due()  # 1 reward of 1000, yet due: the failed one is owed
    assert live.checkpoints.save() is True
    assert checkpoints(engine) == [1]


def end_session_holding(engine: sa.Engine, lock: session.SessionLock) -> None:
    """Terminate the backend holding ``lock`` (as a Postgres restart ends every session)."""
    with engine.connect() as conn:
        pid = lock.holder_pid(conn)
        assert pid is not None
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar_one()


def test_an_instance_name_lost_with_its_session_is_taken_back(engine, instances, caplog):
    """A name is one live instance's: a second claim is refused. When the holder's session
    ends (a Postgres restart), another instance may claim it, and the first says so; once
    that one is gone the first holds its name again."""
    from service.log.session import InstanceNameTaken

    first, second, third = instances("same"), instances("same"), instances("same")
    first.name.claim()
    with pytest.raises(InstanceNameTaken):
        second.name.claim()
    end_session_holding(engine, session.SessionLock(engine, "instance:same"))
    second.name.claim()  # the name was free
    with caplog.at_level("ERROR", logger="service.log.session"):
        first.name.keep()
        first.name.keep()  # told once
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "METALLM_INSTANCE_ID" in errors[0]
    second.close()
    first.name.keep()
    with pytest.raises(InstanceNameTaken):
        third.name.claim()


def test_instances_restored_from_one_checkpoint_draw_their_own_exploration(engine, instances):
    """Same statistics, different draws: each instance seeds its generator from its name
    and start, not from the checkpoint's (where every instance would repeat the others)."""
    params = {"epsilon": 1.0}  # every choice a uniform draw
    first = instances("first", params=params)
    first.live.policy.update("cheap", np.ones(4), 1.0)
    first.live.policy.update("strong", np.ones(4), 0.0)
    first.checkpoints.save()
    first.close()
    a, b = instances("a", params=params), instances("b", params=params)
    for live in (a, b):
        live.restore()
    assert a.rng_seed != b.rng_seed
    assert policy_difference(a.live.policy, b.live.policy) == 0
    contexts = np.ones((64, 4))
    draws = [[c.arm for c in live.live.policy.choose_many(list(ARMS), contexts)] for live in (a, b)]
    assert draws[0] != draws[1]
    again = instances("a", params=params)
    again.restore()  # the same instance at the same point of the log: the same draws
    assert [c.arm for c in again.live.policy.choose_many(list(ARMS), contexts)] == draws[0]


def test_a_decision_committed_after_a_later_one_is_still_paced_by_every_instance(
    engine, instances, tmp_path
):
    """Budget mode: instance A stores q1's decision (decision_seq 1) and pauses before COMMIT
    (taking q1's early label waits for a row the test holds); instance B stores q2's decision
    meanwhile. Every instance's pacer must see both costs, in decision_seq order, so λ is
    the same whichever instance stores the next reward. (Numbered outside one lock, B
    committed seq 2 first, moved past 1 and never saw q1's cost.)"""
    from service.pacing import BudgetPacer

    rows = demo_rows(2)
    config = replay_config(write_outcomes(tmp_path / "o.jsonl", rows, ARMS), list(ARMS))

    def pacer() -> BudgetPacer:
        return BudgetPacer(target_cost_per_query=0.0001, cost_unit=0.001, lr=0.5)

    a, b = (instances(name, budget=pacer()) for name in ("a", "b"))
    deciders = [Decider(config, x, HashEmbedder(), Gateway(config), REWARDS) for x in (a, b)]
    q1, q2 = (
        QueryRecord(QueryEvent(query_id=r["query_id"], text=r["text"], task=r["task"]))
        for r in rows
    )
    with engine.begin() as conn:  # q1's label came first: storing q1 takes it
        label_sql.add_pending_label(conn, q1.event.query_id, rows[0]["label"], None)
    try:
        with row_locked(engine, "SELECT * FROM pending_labels FOR UPDATE"):
            thread_a, _ = in_thread(lambda: deciders[0].decide([q1]))
            wait_for(lambda: waiting_backends(engine) >= 1, 30, message="A paused")
            thread_b, done_b = in_thread(lambda: deciders[1].decide([q2]))
            wait_for(
                lambda: done_b or waiting_backends(engine) >= 2, 30, message="B stored or waiting"
            )
            b.catch_up()
        thread_a.join(30)
        thread_b.join(30)
        assert not thread_a.is_alive() and not thread_b.is_alive()
    finally:
        for decider in deciders:
            decider.close()
    with engine.connect() as conn:
        costs = (
            conn.execute(sa.text("SELECT cost_usd FROM decisions ORDER BY decision_seq"))
            .scalars()
            .all()
        )
    expected = pacer()
    for cost in costs:
        expected.observe(cost)
    for live in (a, b):
        live.catch_up()
        assert live.live.decision_watermark == 2
        assert live.live.pacer.n_observed == 2
        assert live.live.pacer.lam == pytest.approx(expected.lam, abs=1e-12)


def test_a_follower_applies_another_instances_reward_woken_by_its_notify(engine, instances):
    """B's follower sleeps on LISTEN with a poll far longer than the test: only the NOTIFY of
    A's transaction can wake it in time, and B then holds A's reward without being asked."""

    insert_decision(engine, "q1")
    a, b = instances("a"), instances("b")
    follower = LogFollower(b, poll_s=120).start()
    try:
        wait_for(lambda: follower.listener.listening, 10, message="B listening")
        Learner(a, REWARDS, 3600).learn(labels(("q1", "a")))
        wait_for(lambda: b.live.watermark == 1, 10, message="B woken and synced")
    finally:
        started = time.monotonic()
        follower.stop()
    assert time.monotonic() - started < 10  # stop ends the wait, not the 120 s poll
    assert policy_difference(a.live.policy, b.live.policy) == 0


def test_a_listener_is_not_woken_by_its_own_instance(engine):
    """An instance applies its own appends as it stores them; only the others' wake its
    follower (woken by its own, the follower took the policy's lock from the consumer that had
    just stored them: benchmarks/scale_out.py, part 2)."""
    listener = LogListener(_same_schema(engine), ignore="a")
    try:
        listener.wait(0.01)  # LISTEN from here on
        for sender in ("a", "b", "a"):
            with engine.begin() as conn:
                transaction.lock_learning_log(conn, sender)
        assert listener.wait(2.0) == 1  # b's; a's own two are skipped
        with engine.begin() as conn:
            transaction.lock_learning_log(conn, "a")
        assert listener.wait(0.5) == 0
    finally:
        listener.close()
        listener.engine.dispose()
