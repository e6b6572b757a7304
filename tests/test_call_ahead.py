"""Decider.call_ahead against the real Postgres, embedder and replay arms: what a call started
ahead of its batch becomes when something fails — one query's call, or the whole job."""

from __future__ import annotations

import pytest

from service.events import QueryEvent
from service.pipeline import Decider, QueryRecord, RewardSettings
from tests.conftest import wait_for
from tests.helpers import (
    ARMS,
    CountingReplay,
    counting_gateway,
    demo_rows,
    open_learning_log,
    replay_config,
    write_outcomes,
)

pytestmark = pytest.mark.integration


def make_decider(engine, embedder, tmp_path, rows) -> Decider:
    config = replay_config(write_outcomes(tmp_path / "o.jsonl", rows, ARMS), list(ARMS))
    learning_log = open_learning_log(engine, "linucb", {"alpha": 1.0})
    gateway = counting_gateway(config)
    return Decider(config, learning_log, embedder, gateway, RewardSettings(0.1, 0.001))


def events(rows) -> list[QueryEvent]:
    return [QueryEvent(query_id=r["query_id"], text=r["text"], task=r["task"]) for r in rows]


def test_one_call_failing_keeps_the_others_calls(engine, embedder, tmp_path):
    rows = demo_rows(6)
    bad = rows[2]["query_id"]
    decider = make_decider(engine, embedder, tmp_path, rows)
    call = decider.gateway.call

    async def buggy_call(arm, request):  # a bug after the call (parsing, pricing…)
        result = await call(arm, request)
        if request.query_id == bad:
            raise RuntimeError("a bug in the gateway")
        return result

    decider.gateway.call = buggy_call
    start = CountingReplay.calls
    try:
        decider.call_ahead(events(rows))
        records = [QueryRecord(e) for e in events(rows)]
        with pytest.raises(RuntimeError, match="a bug"):
            decider.decide(records)  # the batch fails: its events are retried one by one
        assert CountingReplay.calls - start == 7  # six ahead, the failed one once more
        for record in records:
            if record.event.query_id == bad:
                with pytest.raises(RuntimeError, match="a bug"):
                    decider.decide([record])
            else:
                assert [d.query_id for d in decider.decide([record]).new] == [record.event.query_id]
        assert CountingReplay.calls - start == 8  # the five others were called once each
    finally:
        decider.close()


def test_a_failed_ahead_job_is_started_again_by_the_next_call_ahead(engine, embedder, tmp_path):
    """The embedder fails the first job; once that is known, the batch polled again (a
    rewind) starts a job of its own, before ``decide``, which then only waits for it."""
    rows = demo_rows(6)
    decider = make_decider(engine, embedder, tmp_path, rows)
    embed = decider.vectors.embedder.embed
    embedded: list[list[str]] = []  # every batch of texts the embedder was given

    def failing_once(texts):
        embedded.append(list(texts))
        if len(embedded) == 1:
            raise RuntimeError("the embedder broke")
        return embed(texts)

    decider.vectors.embedder = type("Failing", (), {"embed": staticmethod(failing_once)})()
    start = CountingReplay.calls
    try:
        decider.call_ahead(events(rows))
        # polled again until the failure is known: then the rewound batch is started anew
        wait_for(
            lambda: decider.call_ahead(events(rows)) or len(embedded) == 2,
            timeout=30,
            interval=0.01,
            message="a second job",
        )
        decided = decider.decide([QueryRecord(e) for e in events(rows)]).new
        assert len(decided) == 6
        assert len(embedded) == 2  # decide made no job of its own
        assert CountingReplay.calls - start == 6  # nothing called twice
    finally:
        decider.close()
