"""``metallm bench --through-service``: replay an outcomes file through the real service.

The same stream as the in-process benchmark goes through Kafka → the query consumer →
embedding → the policy → ``replay`` arms (answering from the outcomes file) → Postgres, and
labels come back through the label consumer. To make the service's decisions reproducible the
events are interleaved exactly as :func:`~evaluation.bench.simulate` orders them: publish
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
from typing import Any, ClassVar

import numpy as np
import sqlalchemy as sa

from evaluation.bench import BenchConfig, Problem, StreamResult, one_blas_thread
from service.config import AppConfig, parse_config
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
    from app.application import Application
    from consumers.kafka_io import make_producer
    from service.llm.gateway import Gateway

    if config.budget is not None:
        raise ThroughServiceError("--through-service replays a fixed λ; drop --budget")
    tag = uuid.uuid4().hex[:10]
    schema = schema or f"bench_{tag}"
    topics = isolated_stream_names(f"bench-{tag}")
    s = _replay_settings(settings, config, seed, schema, topics)
    app_config = replay_app_config(problem, outcomes, config.feature_kinds())
    events = [query_event(problem, t) for t in range(start, problem.n)]  # validate up front
    engine, warm_updates = _prepare_schema(s, config.policy, warm_state)

    service = Application.build(
        s, config=app_config, embedder=embedder, gateway=Gateway(app_config)
    )
    if service.live.policy.n_updates != warm_updates:
        service.stop()
        raise ThroughServiceError(f"schema {schema} is not fresh: it holds earlier rewards")
    replay = _Replay(problem, s, service, make_producer(s), engine, timeout)
    began = time.monotonic()
    with one_blas_thread():  # as the fast path (and `metallm serve`) runs
        service.start()
        try:
            arms, props = replay.stream(start, events, config.delay, warm_updates, progress)
        finally:
            replay.producer.close()
            service.stop()
            _delete_topics(s, topics)
            engine.dispose()
    return ServiceRun(
        arms, props, schema, time.monotonic() - began, service.live.policy.n_updates, topics
    )


def _replay_settings(
    settings: Settings, config: BenchConfig, seed: int, schema: str, topics: dict[str, str]
) -> Settings:
    """``settings`` for the service of a replay: its own topics and schema, the bench's
    policy, seed, context, λ and cost unit, and no checkpoints or metrics port of its own."""
    return settings.model_copy(
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


def _prepare_schema(
    settings: Settings, policy: str, warm_state: bytes | None
) -> tuple[sa.Engine, int]:
    """Migrate the replay's schema and store ``warm_state`` as its first checkpoint; an
    engine on it, and the warm start's number of updates (0 without one)."""
    from service import storage
    from service.learning import Snapshot
    from service.log.checkpoints import save_checkpoint
    from service.migrate import upgrade

    upgrade(settings.database_url, settings.database_schema)
    engine = storage.make_engine(settings.database_url, settings.database_schema)
    if warm_state is None:
        return engine, 0
    from service.policy import loads

    warm_updates = loads(warm_state).n_updates
    with engine.begin() as conn:
        save_checkpoint(conn, Snapshot(policy, warm_updates, 0, 0, warm_state))
    return engine, warm_updates


@dataclass
class _Replay:
    """The events of a stream, sent one at a time to a running service, each followed by a
    wait until the service has acted on it (the decision stored, the reward applied)."""

    DECISION: ClassVar = sa.text("SELECT arm, propensity FROM decisions WHERE query_id = :q")

    problem: Problem
    settings: Settings
    service: Any
    producer: Any
    engine: sa.Engine
    timeout: float
    expected: int = 0  # the policy updates the service should have applied by now

    def stream(
        self,
        start: int,
        events: list[QueryEvent],
        delay: int,
        updates: int,
        progress: Callable[[int, int], None] | None,
    ) -> tuple[list[str], list[float]]:
        """Queries ``start..n-1``, their labels as :func:`~evaluation.bench.simulate`
        reveals them; the arm and propensity of each decision. ``updates``: the policy's to
        begin with."""
        index = {a: j for j, a in enumerate(self.problem.arms)}
        arms: list[str] = []
        props: list[float] = []
        pending: list[int] = []
        self.expected = updates
        for i, t in enumerate(range(start, self.problem.n)):
            row = self.decision(events[i])
            arms.append(row.arm)
            props.append(float(row.propensity))
            if self.problem.failed[t, index[row.arm]]:
                self.expected += 1  # rewarded by the service at decision time
            else:
                pending.append(t)
            while pending and pending[0] <= t - delay:
                self.label(pending.pop(0))
            self.wait_applied()
            if progress is not None:
                progress(i + 1, len(events))
        for t in pending:
            self.label(t)
        self.wait_applied()
        return arms, props

    def decision(self, event: QueryEvent):
        """Publish ``event``; its decision row (arm, propensity), once stored."""
        self.send(self.settings.queries_topic, event.query_id, event.to_bytes())

        def decided():
            with self.engine.connect() as conn:
                return conn.execute(self.DECISION, {"q": event.query_id}).first()

        return self.wait(decided, f"the decision of {event.query_id}")

    def label(self, t: int) -> None:
        """Publish query ``t``'s label: one more update for the policy to apply."""
        record = self.problem.records[t]
        event = LabelEvent(query_id=record.query_id, label=record.label)
        self.send(self.settings.labels_topic, record.query_id, event.to_bytes())
        self.expected += 1

    def wait_applied(self) -> None:
        def applied() -> bool:
            return self.service.live.policy.n_updates >= self.expected

        self.wait(applied, f"{self.expected} policy updates")

    def send(self, topic: str, key: str, value: bytes) -> None:
        self.producer.send(topic, key=key.encode(), value=value).get(timeout=30)

    def wait(self, condition: Callable[[], Any], what: str) -> Any:
        return _wait(condition, what, self.timeout, self.service.crashed)


def _delete_topics(settings: Settings, topics: dict[str, str]) -> None:
    """Delete the replay's topics; a failure is logged, not raised (cleaning up must not hide
    the run's own error)."""
    from consumers.kafka_io import delete_topics

    try:
        delete_topics(settings, [v for k, v in topics.items() if k.endswith("_topic")])
    except Exception:  # cleaning up must not hide the run's own error
        log.warning("could not delete the bench topics", exc_info=True)


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
