"""A SIGTERM that lands while the queries group rebalances (a second instance joining): the
stopped instance finishes what it holds, completes the rebalance (Tansu stalls a group whose
member leaves between revocation and assignment: the other's join waited for the rebalance
timeout, ten minutes) and exits 0 within seconds; the other instance decides every query."""

from __future__ import annotations

import time

import pytest

from consumers.kafka_io import create_topics
from tests.conftest import DATABASE_URL
from tests.faults.harness import (
    ArmServer,
    ServiceProcess,
    arm_config,
    make_queries,
    progress,
    publish,
    service_env,
    wait_until,
    write_config,
)
from tests.faults.test_postgres_outage import ARMS

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_sigterm_during_a_rebalance_exits_cleanly(broker, topics, pg_schema, tmp_path, engine):
    queries = make_queries(120, prefix="q-sr")
    create_topics(broker, [t for k, t in topics.items() if k.endswith("_topic")], 6)
    with ArmServer({q.query_id: q for q in queries}, {"cheap": 0.6, "strong": 0.9}) as server:
        for arm in server.modes:  # slow arms: the first instance holds calls at the rebalance
            server.modes[arm], server.delay[arm] = "slow", 0.3
        config = write_config(tmp_path / "config.yaml", arm_config(server, ARMS))
        env = service_env(broker, topics, DATABASE_URL, pg_schema, config, poll_max_records=5)
        first = ServiceProcess({**env, "METALLM_INSTANCE_ID": "a"}, tmp_path / "a.log").start()
        second = ServiceProcess(
            {**env, "METALLM_INSTANCE_ID": "b"}, tmp_path / "b.log", standby=True
        ).start()
        try:
            wait_until(lambda: first.serving, 60, "the first instance serving")
            publish(
                broker, topics["queries_topic"], [(q.query_id.encode(), q.event()) for q in queries]
            )
            wait_until(lambda: progress(engine)[0] >= 10, 60, "10 decisions")
            second.go()
            # the group's rebalance reaches the first instance: it finishes what it holds
            wait_until(lambda: "rebalance takes" in first.log(), 60, "the rebalance")
            stopped = time.monotonic()
            assert first.terminate(timeout=60) == 0, first.log()[-3000:]
            assert time.monotonic() - stopped < 30
            wait_until(lambda: progress(engine)[0] == len(queries), 90, "every query decided")
        finally:
            first.kill()
            second.kill()
        calls = server.calls_by_query()
    assert set(calls) == {q.query_id for q in queries}
    assert "Traceback" not in first.log() + second.log()
    assert "queries: assigned" in second.log()
