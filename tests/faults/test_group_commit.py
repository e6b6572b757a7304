"""Group commit on the query path, against the real broker, Postgres and a local arm server.

One poll of queries whose calls end at different times, one of them slow: each answer is
published once its own call ended, before the slow call of the same batch ends; the offsets
committed are never ahead of a stored decision (sampled all along, committed offsets against
the decisions table), and stay at the slow query's offset until it is stored; each decision
records its call's own latency apart from its wait for a slot. The kill -9 half (nothing lost,
no committed call repeated) is the kill scenario's (``test_kill9.py``), whose calls end out of
order too.
"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from consumers.kafka_io import ensure_topics
from tests.conftest import DATABASE_URL
from tests.faults.harness import (
    ArmServer,
    arm_config,
    build_service,
    decisions,
    make_queries,
    publish,
    read_all,
    wait_until,
)
from tests.helpers import committed_offset, settings_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

N = 24
SLOW = 2  # the offset of the slow query (1 partition: offsets are the queries' order)
SLOW_S = 4.0  # the others end within 8 waves of ARM_S, whichever arms the policy picks
ARM_S = 0.2  # every other call
IN_FLIGHT = 4  # per arm: 23 calls over two arms, so some wait two waves or more for a slot
PRICES = {"cheap": (0.1, 0.2), "strong": (3.0, 6.0)}


class OffsetWatch:
    """Samples, until stopped, the group's committed offset and then the offsets stored in
    ``decisions``: at every sample, every offset below the committed one must be stored."""

    def __init__(self, broker: str, topics: dict[str, str], engine: sa.Engine) -> None:
        self.broker, self.topics, self.engine = broker, topics, engine
        self.samples: list[int] = []
        self.ahead: list[tuple[int, list[int]]] = []  # (committed, offsets below it not stored)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            committed = committed_offset(
                self.broker, self.topics["queries_topic"], self.topics["queries_group"]
            )
            with self.engine.connect() as conn:
                stored = set(conn.execute(sa.text("SELECT kafka_offset FROM decisions")).scalars())
            if committed is not None:
                self.samples.append(committed)
                missing = [o for o in range(committed) if o not in stored]
                if missing:
                    self.ahead.append((committed, missing))
            self.stop.wait(0.02)


def test_answers_go_out_as_their_calls_end_and_offsets_never_pass_a_stored_decision(
    broker, topics, pg_schema, engine
):
    queries = make_queries(N, prefix="q-group")
    slow = queries[SLOW].query_id
    server = ArmServer({q.query_id: q for q in queries}, {"cheap": 0.6, "strong": 0.9}).start()
    server.modes = {"cheap": "slow", "strong": "slow"}
    server.delay = {"cheap": ARM_S, "strong": ARM_S}
    server.delay_ids = {slow: SLOW_S}
    room = {name: {"max_in_flight": IN_FLIGHT} for name in PRICES}
    settings = settings_for(
        broker, topics, pg_schema, DATABASE_URL, poll_max_records=64, topic_partitions=1
    )
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    service = build_service(settings, arm_config(server, PRICES, **room))
    watch = OffsetWatch(broker, topics, engine)
    service.start()
    watch.thread.start()
    try:
        publish(
            broker, topics["queries_topic"], [(q.query_id.encode(), q.event()) for q in queries]
        )
        fast = [q.query_id for q in queries if q.query_id != slow]
        wait_until(
            lambda: len(decisions(engine)) == N - 1, 30, "every fast query decided", interval=0.02
        )
        # the batch's other answers are out while its slow call is still going on, and the
        # offsets wait at the slow query (stored are 0..N-1 but SLOW)
        wait_until(
            lambda: len(read_all(broker, topics["decisions_topic"])) == N - 1,
            10,
            "the fast queries' decisions published",
        )
        wait_until(
            lambda: (
                committed_offset(broker, topics["queries_topic"], topics["queries_group"]) == SLOW
            ),
            10,
            "the offsets committed up to the slow query",
        )
        assert slow not in server.answered_at
        wait_until(lambda: len(decisions(engine)) == N, 30, "the slow query decided")
        wait_until(
            lambda: committed_offset(broker, topics["queries_topic"], topics["queries_group"]) == N,
            30,
            "every offset committed",
        )
        # the watch's own samples reach the end too (each takes a broker round trip: on a
        # loaded machine it can lag the wait above)
        wait_until(lambda: N in watch.samples, 30, "the watch sampling the last offset")
    finally:
        watch.stop.set()
        watch.thread.join(10)
        service.stop()
        server.kill()
    # offsets were never ahead of a stored decision, sampled all along
    assert watch.ahead == []
    assert SLOW in watch.samples and N in watch.samples, sorted(set(watch.samples))
    # each answer was published once its call ended, before the next calls of the slow's
    # batch: the event's timestamp (when the service sent it) is after its call's answer
    events = {e.key.decode(): e for e in read_all(broker, topics["decisions_topic"])}
    assert sorted(events) == sorted(q.query_id for q in queries)
    for qid in fast:
        sent_at = events[qid].timestamp / 1000
        assert server.answered_at[qid] - 0.01 <= sent_at < server.answered_at[slow]
    # each query called once; latency is the call's own, the queueing for a slot apart
    assert server.calls_by_query() == {q.query_id: 1 for q in queries}
    rows = {r["query_id"]: r for r in decisions(engine)}
    assert rows[slow]["latency_ms"] >= SLOW_S * 1000 * 0.95
    assert all(ARM_S * 1000 * 0.9 <= rows[q]["latency_ms"] < SLOW_S * 1000 for q in fast)
    waited = [rows[q]["wait_ms"] for q in fast]
    assert all(w is not None and w >= 0 for w in waited)
    assert max(waited) >= 2 * ARM_S * 1000 * 0.9  # queued behind two waves of its arm
    assert service.queries.groups > 1  # stored in several groups, not as one batch
