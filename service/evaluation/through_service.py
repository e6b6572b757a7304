"""``metallm bench --through-service``: replay an outcomes file through the real service.

The same stream as the in-process benchmark goes through Kafka → the query consumer →
embedding → the policy → ``replay`` arms (answering from the outcomes file) → Postgres, and
labels come back through the label consumer. To make the service's decisions reproducible the
events are interleaved exactly as :func:`~service.evaluation.bench.simulate` orders them: publish
query ``t``, wait for its decision row; publish the label that falls due (query ``t − delay``),
wait until the policy has applied it; then query ``t + 1``. Failed recorded calls are rewarded by
the service itself at decision time, as in the fast path. With the same policy, parameters and
seed, the service must then choose the same arm with the same propensity on every query.

The run leaves its decisions in a Postgres schema of its own (printed), ready for
``metallm evaluate --from-db``; its topics are deleted afterwards.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from service.config import AppConfig, parse_config
from service.evaluation.bench import BenchConfig, Problem, StreamResult, one_blas_thread
from service.events import LabelEvent, QueryEvent
from service.outcomes import DEFAULT_TASK
from service.settings import Settings, isolated_stream_names

log = logging.getLogger(__name__)


class ThroughServiceError(RuntimeError):
    """The service did not do what the replay expected in time (message says what)."""


def replay_app_config(
    problem: Problem, outcomes: Path, features: dict[str, str] | None = None
) -> AppConfig:
    """Tasks and arms for replaying ``outcomes``: one classification task per task name of the
    file (labels: every option and label seen; declaring every metadata feature of
    ``features``, ``{key: kind}``), one ``replay`` arm per arm, in file order, with no retries,
    no fallback and a circuit breaker that never opens."""
    labels: dict[str, dict[str, None]] = {}
    for record in problem.records:
        seen = labels.setdefault(record.task or DEFAULT_TASK, {})
        for value in [*(record.options or []), record.label]:
            if value.strip():
                seen.setdefault(value, None)
    tasks = {}
    for name, seen in labels.items():
        values = list(seen)
        if len(values) < 2:
            values.append("(none of these)")
        tasks[name] = {"kind": "classification", "labels": values, "features": features or {}}
    arms = [
        {
            "name": arm,
            "provider": "replay",
            "model": arm,
            "outcomes": str(Path(outcomes).resolve()),
            "max_retries": 0,
            "breaker_failures": 1_000_000_000,
        }
        for arm in problem.arms
    ]
    return parse_config({"tasks": tasks, "arms": arms}, source=f"replay of {outcomes}")


def query_event(problem: Problem, t: int) -> QueryEvent:
    record = problem.records[t]
    return QueryEvent(
        query_id=record.query_id,
        text=record.text,
        task=record.task or DEFAULT_TASK,
        options=record.options,
        metadata=record.metadata,
    )


@dataclass
class ServiceRun:
    """What the service decided, in stream order, and where it left its decisions."""

    arms: list[str]
    propensities: list[float]
    schema: str
    seconds: float
    n_updates: int
    topics: dict[str, str] = field(default_factory=dict)


def _wait(condition: Callable[[], Any], what: str, timeout: float, crashed) -> Any:
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        value = condition()
        if value:
            return value
        if crashed.is_set():
            raise ThroughServiceError(f"the service crashed while waiting for {what}")
        if time.monotonic() > deadline:
            raise ThroughServiceError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def run_through_service(
    problem: Problem,
    outcomes: Path,
    settings: Settings,
    config: BenchConfig,
    seed: int,
    start: int,
    embedder,
    warm_state: bytes | None = None,
    schema: str | None = None,
    timeout: float = 120.0,
    progress: Callable[[int, int], None] | None = None,
) -> ServiceRun:
    """Stream queries ``start..n-1`` (and their labels) through a real service; see the module
    docstring. ``warm_state`` is a policy checkpoint stored before the service starts (the
    warm start); ``settings`` gives the Kafka and Postgres to use."""
    from kafka import KafkaAdminClient

    from consumers.kafka_io import client_options, make_producer
    from consumers.runner import Service
    from service import storage
    from service.llm.gateway import Gateway
    from service.migrate import upgrade

    if config.budget is not None:
        raise ThroughServiceError("--through-service replays a fixed λ; drop --budget")
    tag = uuid.uuid4().hex[:10]
    schema = schema or f"bench_{tag}"
    topics = isolated_stream_names(f"bench-{tag}")
    s = settings.model_copy(
        update={
            **topics,
            "database_schema": schema,
            "policy": config.policy,
            "policy_params": config.params(seed),
            # the bench's draws: its policy's generator, seeded with the policy's seed
            "draws_seed": config.params(seed).get("seed"),
            **config.context_settings(),
            "reward_lambda": config.lam,
            "cost_unit_usd": config.cost_unit,
            "checkpoint_every": 1_000_000_000,
            "metrics_port": None,  # a replay next to a running service must not clash
            "topic_partitions": 1,  # one total order of queries and labels, as the bench's
        }
    )
    app_config = replay_app_config(problem, outcomes, config.feature_kinds())
    events = [query_event(problem, t) for t in range(start, problem.n)]  # validate up front
    upgrade(s.database_url, schema)
    engine = storage.make_engine(s.database_url, schema)
    warm_updates = 0
    if warm_state is not None:
        from service.policy import loads

        warm_updates = loads(warm_state).n_updates
        with engine.begin() as conn:
            storage.save_checkpoint(conn, config.policy, warm_updates, 0, warm_state)

    service = Service.build(s, config=app_config, embedder=embedder, gateway=Gateway(app_config))
    if service.live.policy.n_updates != warm_updates:
        raise ThroughServiceError(f"schema {schema} is not fresh: it holds earlier rewards")
    producer = make_producer(s)
    lookup = sa.text("SELECT arm, propensity FROM decisions WHERE query_id = :q")
    index = {a: j for j, a in enumerate(problem.arms)}
    arms: list[str] = []
    props: list[float] = []
    chosen: dict[int, int] = {}
    pending: list[int] = []
    expected = warm_updates
    began = time.monotonic()

    def send(topic: str, key: str, value: bytes) -> None:
        producer.send(topic, key=key.encode(), value=value).get(timeout=30)

    def label(t: int) -> None:
        record = problem.records[t]
        event = LabelEvent(query_id=record.query_id, label=record.label)
        send(s.labels_topic, record.query_id, event.to_bytes())

    def applied() -> bool:
        return service.live.policy.n_updates >= expected

    with one_blas_thread():  # as the fast path (and `metallm serve`) runs
        service.start()
        try:
            for i, t in enumerate(range(start, problem.n)):
                event = events[i]
                send(s.queries_topic, event.query_id, event.to_bytes())

                def decided(qid: str = event.query_id):
                    with engine.connect() as conn:
                        return conn.execute(lookup, {"q": qid}).first()

                row = _wait(decided, f"the decision of {event.query_id}", timeout, service.crashed)
                arms.append(row.arm)
                props.append(float(row.propensity))
                j = index[row.arm]
                chosen[t] = j
                if problem.failed[t, j]:
                    expected += 1  # rewarded by the service at decision time
                else:
                    pending.append(t)
                while pending and pending[0] <= t - config.delay:
                    label(pending.pop(0))
                    expected += 1
                _wait(applied, f"{expected} policy updates", timeout, service.crashed)
                if progress is not None:
                    progress(i + 1, len(events))
            for t in pending:
                label(t)
            expected += len(pending)
            _wait(applied, f"{expected} policy updates", timeout, service.crashed)
        finally:
            producer.close()
            service.stop()
            admin = KafkaAdminClient(**client_options(s))
            try:
                existing = set(admin.list_topics())
                doomed = [v for k, v in topics.items() if k.endswith("_topic") and v in existing]
                if doomed:
                    admin.delete_topics(doomed)
            except Exception:  # cleaning up must not hide the run's own error
                log.warning("could not delete the bench topics", exc_info=True)
            finally:
                admin.close()
            engine.dispose()
    return ServiceRun(
        arms, props, schema, time.monotonic() - began, service.live.policy.n_updates, topics
    )


def compare(problem: Problem, start: int, fast: StreamResult, run: ServiceRun) -> dict[str, Any]:
    """Query by query: same arm, and the same propensity (to 1e-9)?"""
    fast_arms = [problem.arms[j] for j in fast.choices]
    mismatches = [
        i
        for i, (a, b, p, q) in enumerate(
            zip(fast_arms, run.arms, fast.propensities, run.propensities, strict=True)
        )
        if a != b or not np.isclose(p, q, rtol=0, atol=1e-9)
    ]
    out: dict[str, Any] = {
        "queries": len(fast_arms),
        "same_decisions": len(fast_arms) - len(mismatches),
        "identical": not mismatches,
        "schema": run.schema,
        "seconds": round(run.seconds, 2),
        "queries_per_second": round(len(fast_arms) / run.seconds, 2) if run.seconds else None,
    }
    if mismatches:
        i = mismatches[0]
        out["first_mismatch"] = {
            "query_id": problem.records[start + i].query_id,
            "position": start + i,
            "fast": [fast_arms[i], float(fast.propensities[i])],
            "service": [run.arms[i], run.propensities[i]],
        }
    return out
