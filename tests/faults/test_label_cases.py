"""Every label case of issue 6 through the running service on the real broker and Postgres:
before its decision, duplicated, conflicting (before and after the decision), for an unknown
id, after the pending-label TTL, and for a decision whose arm failed. Each case's outcome is
the one documented in docs/interface.md (unit-level versions: ``tests/test_labels.py``)."""

from __future__ import annotations

import logging
import time

import pytest

from consumers.kafka_io import ensure_topics
from service.log import read_models
from tests.conftest import DATABASE_URL
from tests.faults.harness import (
    ArmServer,
    arm_config,
    build_service,
    decisions,
    make_queries,
    policy_difference,
    progress,
    publish,
    rebuild_policy,
    scalar,
    wait_until,
)
from tests.faults.test_postgres_outage import ARMS
from tests.helpers import settings_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

TTL = 2.0


def test_every_label_case_has_its_documented_outcome(broker, topics, pg_schema, engine, caplog):
    qs = make_queries(9, prefix="q-lab")
    early, dup, conflict, early_dup, early_conflict, unknown, after_ttl, failed, early_failed = qs
    settings = settings_for(
        broker,
        topics,
        pg_schema,
        DATABASE_URL,
        pending_label_ttl_seconds=TTL,
        pending_label_expire_every_seconds=0.3,
    )
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])

    def labels(*pairs) -> None:
        publish(
            broker,
            topics["labels_topic"],
            [(q.query_id.encode(), q.label_event(label)) for q, label in pairs],
        )

    def row(q) -> dict:
        (found,) = decisions(engine, f"query_id = '{q.query_id}'")
        return found

    with ArmServer({q.query_id: q for q in qs}, {"cheap": 1.0, "strong": 1.0}) as server:
        server.fail_ids = {failed.query_id, early_failed.query_id}
        service = build_service(settings, arm_config(server, ARMS))
        service.start()
        caplog.set_level(logging.WARNING)
        try:
            # 1. labels whose query never comes in time: kept, then dropped after the TTL
            labels((unknown, unknown.label), (after_ttl, after_ttl.label))
            wait_until(lambda: progress(engine)[2] == 2, 30, "2 pending labels")
            wait_until(lambda: progress(engine)[2] == 0, 30, "the TTL to expire them")
            # 2. labels before their decisions: kept until it is stored (first one wins)
            labels(
                (early, early.label),
                (early_dup, early_dup.label),
                (early_dup, early_dup.label),
                (early_conflict, early_conflict.wrong),
                (early_conflict, early_conflict.label),
                (early_failed, early_failed.label),
            )
            # a copy waits as one label; each different label of a query in a row of its own
            wait_until(lambda: progress(engine)[2] == 5, 30, "5 pending labels")
            # 3. the queries (not `unknown`: it is never decided)
            decided = [q for q in qs if q is not unknown]
            publish(
                broker, topics["queries_topic"], [(q.query_id.encode(), q.event()) for q in decided]
            )
            wait_until(lambda: progress(engine)[0] == 8, 30, "8 decisions")
            # 4. labels after their decisions: duplicated, conflicting, for a failed arm
            labels(
                (dup, dup.label),
                (dup, dup.label),
                (conflict, conflict.label),
                (conflict, conflict.wrong),
                (failed, failed.label),
            )
            wait_until(
                lambda: (
                    scalar(engine, "SELECT count(*) FROM decisions WHERE label IS NOT NULL") == 7
                ),
                30,
                "7 labels",
            )
            time.sleep(1)  # the duplicates are counted in the same batches
            # the label that expired before its decision is gone: the decision waits for one
            assert row(after_ttl)["label"] is None and row(after_ttl)["reward_seq"] is None
            before_republish = service.live.policy.n_updates
            labels((after_ttl, after_ttl.label))  # ... and a new one is applied, once
            wait_until(lambda: row(after_ttl)["reward_seq"] is not None, 30, "the re-sent label")
            wait_until(lambda: service.live.policy.n_updates == before_republish + 1, 10, "update")
        finally:
            service.stop()

    # before the decision: applied in the transaction that stores the decision
    assert row(early)["label"] == early.label and row(early)["correct"] is True
    assert row(early)["reward"] > 0.9
    # duplicated: the first counts, the repeat is counted and changes nothing
    assert row(dup)["duplicate_labels"] == 1 and row(dup)["correct"] is True
    assert row(early_dup)["duplicate_labels"] == 1 and row(early_dup)["correct"] is True
    # conflicting: the first label wins, the other is counted and logged
    assert row(conflict)["label"] == conflict.label and row(conflict)["duplicate_labels"] == 1
    assert f"conflicting label for {conflict.query_id}: kept" in caplog.text
    assert row(early_conflict)["label"] == early_conflict.wrong  # first in, even if wrong
    assert row(early_conflict)["correct"] is False and row(early_conflict)["duplicate_labels"] == 1
    # a failed arm was penalised when it failed; its label is stored, not learned again
    for q in (failed, early_failed):
        r = row(q)
        assert r["status"] == "llm_error" and r["reward"] == 0.0 and r["label"] == q.label
        assert r["correct"] is False
    # unknown id: dropped after the TTL, with a log line and a counter
    assert (
        scalar(engine, "SELECT count(*) FROM decisions WHERE query_id = :q", q=unknown.query_id)
        == 0
    )
    assert f"dropped label for {unknown.query_id}: no decision within 2 s" in caplog.text
    with engine.connect() as conn:
        counters = read_models.counters(conn)
    assert counters["labels_expired"] == 2 and counters["duplicate_labels"] == 4
    assert progress(engine) == (8, 8, 0)
    # one policy update per decision, whatever the labels did
    assert service.live.policy.n_updates == 8
    assert policy_difference(service.live.policy, rebuild_policy(engine)) <= 1e-9


def test_a_redelivered_label_event_changes_nothing(engine):
    """Kafka redelivers a batch whose effects were committed (a crash before the offset commit):
    its labels are recognised by their offsets and change nothing, not even the counters. The
    same label sent again (a new offset) is a duplicate, counted once."""
    from service.events import LabelEvent
    from service.pipeline import Learner
    from service.reward import RewardSettings
    from tests.helpers import legacy_context, open_learning_log
    from tests.test_labels import insert_decision

    learning_log = open_learning_log(engine, "linucb", {"seed": 0}, context=legacy_context())
    live = learning_log.live
    learner = Learner(learning_log, RewardSettings(0.1, 0.001), 60)
    insert_decision(engine, "r1")
    batch = [LabelEvent(query_id="r1", label="a"), LabelEvent(query_id="r2", label="b")]
    where = [("labels", 0, 10), ("labels", 0, 11)]
    first = learner.learn(batch, where, "g")
    assert (first.applied, first.pending, first.redelivered) == (1, 1, 0)
    again = learner.learn(batch, where, "g")  # the same events, redelivered
    assert (again.applied, again.pending, again.duplicates, again.redelivered) == (0, 0, 0, 2)
    repeat = learner.learn(batch, [("labels", 0, 12), ("labels", 0, 13)], "g")  # sent again
    assert (repeat.duplicates, repeat.pending_duplicates, repeat.redelivered) == (1, 1, 0)
    other_group = learner.learn(batch[:1], where[:1], "another-group")  # its own progress
    assert other_group.duplicates == 1
    with engine.connect() as conn:
        assert read_models.counters(conn)["duplicate_labels"] == 3
    assert live.policy.n_updates == 1
