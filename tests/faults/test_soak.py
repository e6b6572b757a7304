"""The mixed-fault soak, short (issue 25): two ``metallm serve`` instances under a steady load
of queries and labels, with 5 % malformed events, through one of each of a broker pause, a
cut of every Kafka connection, a cut of every Postgres connection, kill -9 of an instance and
its restart, and a burst of arm 5xx — in a seeded order, a few seconds each. It asserts the
invariants only (nothing lost or doubled, every decision published, every malformed event in
the DLQ, the policies equal to the log's replay, every instance ready at the end): how fast
each fault is recovered from is ``benchmarks/soak.py``'s to report."""

from __future__ import annotations

import pytest

from tests.faults.soak_scenario import SoakPlan, broken, run

pytestmark = [pytest.mark.faults, pytest.mark.integration]

PLAN = SoakPlan(
    minutes=0.5,  # the load's least length; the faults below take it past that
    rate=8.0,
    seed=25,
    fault_seconds=(3.0, 5.0),
    warmup=3.0,
    gap=2.0,
    tail=4.0,
    faults=("broker_pause", "broker_cut", "pg_cut", "kill", "arm_5xx"),
    rounds=1,
)


def test_short_mixed_fault_soak_loses_nothing_and_ends_ready(tmp_path):
    f = run(PLAN, tmp_path, say=print)
    print(f.as_dict())
    assert broken(f) == []
    # not vacuous: every fault ran once, under load, and hit what it aimed at
    assert sorted(x.kind for x in f.faults) == sorted(PLAN.faults)
    assert all(x.returned - x.began >= 3.0 for x in f.faults if x.kind != "kill")
    assert f.kills == 1 and f.processes_started == 3  # the killed instance was replaced
    assert f.arm_failures > 0  # decisions whose arm answered 5xx, stored and learnt from
    assert f.queries >= 100 and f.decisions == f.queries == f.rewards_stored
    assert f.labels_published == f.queries and f.failed_sends == 0
    assert f.malformed_published > 0  # and none missing from the DLQ (broken)
    # readiness was probed throughout and was true again at the end on both instances
    assert f.probes > 0
    assert f.final_instances == 2 and len(f.final_ready) == 2
