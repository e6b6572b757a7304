"""kill -9 at ten seeded points (plus two during restarts) while 1,000 queries and their labels
stream through the real ``metallm serve``; restart after each kill; SIGTERM at the end.
(``benchmarks/faults_report.py`` runs the same scenario over 2,000 queries.)"""

from __future__ import annotations

import pytest

from consumers.kafka_io import ensure_topics
from service.log.checkpoints import latest_checkpoint
from tests.conftest import DATABASE_URL
from tests.faults import kill_scenario
from tests.faults.harness import (
    ArmServer,
    ServiceProcess,
    arm_config,
    make_queries,
    progress,
    publish,
    scalar,
    service_env,
    wait_until,
    write_config,
)
from tests.helpers import committed_offset, settings_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

#: queries in the kill -9 scenario: the twelve kills land every ~150 decisions + rewards, each
#: amid batches, slow calls and a checkpoint interval as with more (the benchmark runs 2,000)
N = 1000


def test_kill_9_at_seeded_points_loses_nothing_and_learns_each_label_once(
    broker, pg_schema, tmp_path
):
    f = kill_scenario.run(broker, DATABASE_URL, pg_schema, tmp_path, n=N, say=print)
    print(f.as_dict())
    assert f.kills == 12 and f.restarts == 12
    # every consumed query has exactly one decision row (query_id is the primary key)
    assert f.decisions == f.queries == N
    assert f.lost_decisions == 0 and f.unknown_decisions == 0
    # at every kill, the offsets committed were not past a query without its decision
    assert f.offsets_ahead_of_decisions == 0
    # no LLM call for a decision already committed, counted at the arm across all processes
    assert f.duplicated_calls == 0
    # every label applied exactly once: a reward per decision, one policy update per reward
    assert f.rewards_stored == N and f.lost_rewards == 0
    assert f.policy_updates == N and f.double_applied_rewards == 0
    # checkpoint + replay equals a fresh policy fed every stored reward once, in order
    assert f.max_policy_difference <= 1e-9
    # SIGTERM: exit 0 after a final checkpoint that holds every reward
    assert f.final_exit_code == 0 and f.final_checkpoint_updates == N
    # a label redelivered after a kill changes nothing: only real repeats are counted
    assert f.duplicate_labels_counted == f.duplicate_labels_published
    # every decision reached the decisions topic (at least once)
    assert f.decision_events_missing == 0


def test_sigterm_finishes_in_flight_calls_commits_checkpoints_and_exits_0(
    broker, topics, pg_schema, engine, tmp_path
):
    """SIGTERM while three batches' LLM calls are in flight (the batch in hand and the two
    polled ahead): they finish, all three are stored and their offsets committed, no further
    batch is started, the policy is checkpointed with every reward, and the process exits 0.
    Nothing of them is called again after a restart."""
    queries = make_queries(40, prefix="q-term")
    server = ArmServer({q.query_id: q for q in queries}, {"cheap": 0.6, "strong": 0.9}).start()
    server.modes = {"cheap": "slow", "strong": "slow"}
    server.delay = {"cheap": 2.0, "strong": 2.0}
    room = {name: {"max_in_flight": 30} for name in kill_scenario.PRICES}  # all on one arm, say
    config = write_config(
        tmp_path / "metallm.yaml", arm_config(server, kill_scenario.PRICES, **room)
    )
    # 1 partition: the three batches in flight must be the first 30 queries (those of the 10
    # early labels among them), in the one order they were published in
    env = service_env(
        broker,
        topics,
        DATABASE_URL,
        pg_schema,
        config,
        poll_max_records=10,
        checkpoint_every=1000,
        topic_partitions=1,
    )
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL, topic_partitions=1)
    ensure_topics(settings, list(topics.values())[:4])
    first = ServiceProcess(env, tmp_path / "first.log").start()
    try:
        early = [(q.query_id.encode(), q.label_event()) for q in queries[:10]]
        publish(broker, topics["labels_topic"], early)  # applied when their decisions are stored
        wait_until(
            lambda: progress(engine)[2] == 10, 60, "10 pending labels", alive=lambda: first.alive
        )
        publish(
            broker, topics["queries_topic"], [(q.query_id.encode(), q.event()) for q in queries]
        )
        wait_until(lambda: server.in_flight == 30, 60, "30 calls in flight", interval=0.02)
        code = first.terminate(timeout=60)
    finally:
        first.kill()
    log = first.log()
    assert code == 0, log[-3000:]
    assert "received SIGTERM" in log
    # the batches in flight were finished and stored, with their labels; no fourth was started
    assert progress(engine) == (30, 10, 0)
    assert len(server.calls) == 30
    assert committed_offset(broker, topics["queries_topic"], topics["queries_group"]) == 30
    assert committed_offset(broker, topics["labels_topic"], topics["labels_group"]) == 10
    with engine.connect() as conn:
        checkpoint = latest_checkpoint(conn)
    assert checkpoint.n_updates == 10
    assert checkpoint.reward_watermark == scalar(engine, "SELECT max(reward_seq) FROM decisions")
    assert "policy checkpoint saved (10 updates" in log

    server.modes = {"cheap": "ok", "strong": "ok"}
    second = ServiceProcess(env, tmp_path / "second.log").start()
    try:
        wait_until(
            lambda: progress(engine)[0] == 40, 60, "40 decisions", alive=lambda: second.alive
        )
        assert second.terminate(timeout=60) == 0
    finally:
        second.kill()
        server.kill()
    assert server.calls_by_query() == {q.query_id: 1 for q in queries}


def test_sigterm_during_start_up_exits_0(broker, topics, pg_schema, engine, tmp_path):
    """SIGTERM while ``metallm serve`` is still starting (restoring the policy, loading the
    arms): a clean exit with code 0, as at any other time, not death by the signal."""
    server = ArmServer({}, {"cheap": 0.6, "strong": 0.9}).start()
    config = write_config(tmp_path / "metallm.yaml", arm_config(server, kill_scenario.PRICES))
    env = service_env(broker, topics, DATABASE_URL, pg_schema, config)
    process = ServiceProcess(env, tmp_path / "start.log", standby=True).start()
    try:
        process.go()
        wait_until(lambda: "starting:" in process.log(), 60, "start-up", interval=0.005)
        code = process.terminate(timeout=60)
    finally:
        process.kill()
        server.kill()
    log = process.log()
    assert code == 0, log[-3000:]
    assert "received SIGTERM" in log


def test_a_second_sigterm_exits_at_once(broker, topics, pg_schema, engine, tmp_path):
    """The first SIGTERM waits for the calls in flight; a second one does not wait."""
    import signal

    queries = make_queries(10, prefix="q-twice")
    server = ArmServer({q.query_id: q for q in queries}, {"cheap": 0.6, "strong": 0.9}).start()
    server.modes = {"cheap": "slow", "strong": "slow"}
    server.delay = {"cheap": 8.0, "strong": 8.0}  # under the arms' 10 s timeout
    config = write_config(tmp_path / "metallm.yaml", arm_config(server, kill_scenario.PRICES))
    env = service_env(broker, topics, DATABASE_URL, pg_schema, config, poll_max_records=10)
    ensure_topics(settings_for(broker, topics, pg_schema, DATABASE_URL), list(topics.values())[:4])
    process = ServiceProcess(env, tmp_path / "twice.log").start()
    try:
        publish(
            broker, topics["queries_topic"], [(q.query_id.encode(), q.event()) for q in queries]
        )
        wait_until(lambda: server.in_flight == 10, 60, "10 calls in flight", interval=0.02)
        process.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "received SIGTERM" in process.log(), 10, "the first SIGTERM")
        process.process.send_signal(signal.SIGTERM)
        code = process.process.wait(timeout=5)  # the calls had ~8 s to go
    finally:
        process.kill()
        server.kill()
    assert code == -signal.SIGTERM
    assert progress(engine)[0] == 0  # nothing was stored: those queries are decided after restart
