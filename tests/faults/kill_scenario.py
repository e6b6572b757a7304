"""kill -9 the service at seeded moments while queries and their labels stream through.

The service runs as a real ``metallm serve`` process; its arms are OpenAI-compatible endpoints
in this process (:class:`~tests.faults.harness.ArmServer`), so every LLM call is counted at the
arm, whatever happens to the process that made it. Each kill is followed by a restart. At the
end the service is stopped with SIGTERM and the run is checked against what an uninterrupted
run over the same decisions would have produced. :func:`run` returns the figures; the test
asserts on them and ``benchmarks/faults_report.py`` prints them.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlalchemy as sa

from consumers.kafka_io import create_topics, delete_topics
from service.log.checkpoints import latest_checkpoint
from service.settings import isolated_stream_names
from service.storage import make_engine
from tests.faults.harness import (
    ArmServer,
    ServiceProcess,
    Stopwatch,
    StreamProducer,
    arm_config,
    make_queries,
    policy_difference,
    progress,
    read_all,
    rebuild_policy,
    restored_policy,
    service_env,
    wait_consumed,
    wait_until,
    write_config,
)
from tests.helpers import committed_offset

ACCURACY = {"cheap": 0.6, "strong": 0.9}
PRICES = {"cheap": (0.1, 0.2), "strong": (3.0, 6.0)}  # $ per 1M input / output tokens
CHUNK = 100  # queries published at a time


@dataclass
class KillPoint:
    kind: str  # "progress": when decisions + rewards reach ``at``; "startup": ``delay`` s in
    at: int = 0
    delay: float = 0.0

    def __str__(self) -> str:
        if self.kind == "startup":
            return f"{self.delay:.2f} s after a start"
        return f"progress {self.at} (+{self.delay * 1000:.0f} ms)"


def kill_plan(n: int, progress_kills: int, startup_kills: int, seed: int) -> list[KillPoint]:
    """Kills spread over the stream's progress (decisions + rewards, 0…2n) with seeded jitter,
    and a few right after a (re)start, while the policy is being restored."""
    rng = random.Random(seed)
    total, step = 2 * n, 2 * n / (progress_kills + 1)
    plan = [
        KillPoint(
            "progress",
            at=int(step * (k + 1) + rng.uniform(-step / 4, step / 4)),
            delay=rng.uniform(0.0, 0.25),
        )
        for k in range(progress_kills)
    ]
    for pos in sorted(rng.sample(range(1, progress_kills + 1), startup_kills), reverse=True):
        plan.insert(pos, KillPoint("startup", delay=rng.uniform(0.3, 2.5)))
    assert all(p.at < total for p in plan)
    return plan


@dataclass
class KillFigures:
    queries: int = 0
    labels_published: int = 0
    early_labels: int = 0
    duplicate_labels_published: int = 0
    kills: int = 0
    restarts: int = 0
    decisions: int = 0
    lost_decisions: int = 0
    unknown_decisions: int = 0
    rewards_stored: int = 0
    lost_rewards: int = 0
    calls: int = 0
    duplicated_calls: int = 0  # calls for queries whose decision was already committed
    recalled_after_kill: int = 0  # queries in flight (not committed) at a kill, asked again
    # offsets committed at a kill past a query with no decision stored (group commit stores
    # queries as their calls end: the offsets must wait for the slow ones)
    offsets_ahead_of_decisions: int = 0
    policy_updates: int = 0
    double_applied_rewards: int = 0
    max_policy_difference: float = float("inf")
    duplicate_labels_counted: int = 0
    decision_events_missing: int = 0
    final_checkpoint_updates: int = 0
    final_exit_code: int | None = None
    seconds: float = 0.0
    kill_points: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _decision_event_ids(bootstrap: str, topic: str) -> Counter:
    """Query ids of every event on the decisions topic, read to its high-water mark (not
    until the topic has been quiet a while)."""
    return Counter((message.key or b"").decode() for message in read_all(bootstrap, topic))


def run(
    bootstrap: str,
    database_url: str,
    schema: str,
    workdir: Path,
    n: int = 2000,
    progress_kills: int = 10,
    startup_kills: int = 2,
    seed: int = 6,
    poll_max_records: int = 50,
    checkpoint_every: int = 37,
    say: Callable[[str], None] = lambda _: None,
) -> KillFigures:
    clock = Stopwatch()
    figures = KillFigures(queries=n)
    queries = make_queries(n, seed=seed)
    truth = {q.query_id: q for q in queries}
    tag = uuid.uuid4().hex[:8]
    topics = isolated_stream_names(f"kill-{tag}")
    topic_names = [v for k, v in topics.items() if k.endswith("_topic")]
    create_topics(bootstrap, topic_names, 1)
    engine = make_engine(database_url, schema)
    server = ArmServer(truth, ACCURACY, parse_errors=0.02).start()
    # one query in 20 answered late: calls end out of order, so group commit stores queries
    # past a slow one while the slow one's offset holds the partition's commit back
    slow_rng = random.Random(seed + 2)
    server.delay_ids = {q.query_id: 0.4 for q in queries if slow_rng.random() < 0.05}
    config = write_config(workdir / "metallm.yaml", arm_config(server, PRICES))
    env = service_env(
        bootstrap,
        topics,
        database_url,
        schema,
        config,
        poll_max_records=poll_max_records,
        labels_poll_max_records=poll_max_records,  # small label batches too: kills land amid them
        checkpoint_every=checkpoint_every,
        checkpoint_min_seconds=0,  # a checkpoint every checkpoint_every rewards, kills between
        topic_partitions=1,  # as they were made (decision events read from partition 0)
    )

    def may_publish(i: int) -> bool:  # each chunk once the one before it is mostly decided
        return progress(engine)[0] >= CHUNK * (i - 1)

    stream = StreamProducer(bootstrap, topics, queries, CHUNK, seed + 1, figures, may_publish)

    def moved() -> int:
        decided, rewarded, _ = progress(engine)
        return decided + rewarded

    def decided_ids() -> set[str]:
        with engine.connect() as conn:
            return set(conn.execute(sa.text("SELECT query_id FROM decisions")).scalars())

    def offsets_ahead() -> int:
        """Offsets below the committed one with no decision stored (1 partition)."""
        committed = committed_offset(bootstrap, topics["queries_topic"], topics["queries_group"])
        with engine.connect() as conn:
            stored = set(conn.execute(sa.text("SELECT kafka_offset FROM decisions")).scalars())
        return sum(1 for offset in range(committed or 0) if offset not in stored)

    epoch = 0
    committed_before: dict[int, set[str]] = {0: set()}
    plan = kill_plan(n, progress_kills, startup_kills, seed)
    figures.kill_points = [str(p) for p in plan]

    def spare(number: int) -> ServiceProcess:
        return ServiceProcess(env, workdir / f"service-{number:02d}.log", standby=True).start()

    proc = spare(0).go()
    standby = spare(1)
    stream.start()
    try:
        for point in plan:
            if point.kind == "startup":
                time.sleep(point.delay)
            else:
                target = max(point.at, moved() + 20)
                wait_until(
                    lambda t=target: moved() >= t,
                    timeout=240,
                    message=f"progress {target}",
                    interval=0.02,
                    alive=lambda p=proc: p.alive,
                )
                time.sleep(point.delay)
            if not proc.alive:
                raise AssertionError(f"the service exited by itself:\n{proc.log()[-3000:]}")
            proc.kill()
            figures.kills += 1
            server.wait_idle()
            time.sleep(0.3)  # let Postgres finish with the dead process's sessions
            epoch += 1
            committed_before[epoch] = decided_ids()
            figures.offsets_ahead_of_decisions += offsets_ahead()
            server.epoch = epoch
            say(f"kill {figures.kills} at {point}: {len(committed_before[epoch])} decided")
            proc, standby = standby.go(), spare(epoch + 1)
            figures.restarts += 1
        wait_until(
            lambda: stream.done.is_set() and progress(engine) == (n, n, 0),
            timeout=300,
            message=f"{n} decisions with their rewards",
            alive=lambda: proc.alive and not stream.errors,
        )
        wait_consumed(bootstrap, topics, n, figures.labels_published)
        # the last restart may find the work done: stop it once it serves, as an operator would
        wait_until(lambda: proc.serving, 60, "the last start serving", alive=lambda: proc.alive)
        figures.final_exit_code = proc.terminate()
        if stream.errors:
            raise stream.errors[0]

        # --- what happened -----------------------------------------------------------------
        decided = decided_ids()
        figures.decisions = len(decided)
        figures.lost_decisions = len(set(truth) - decided)
        figures.unknown_decisions = len(decided - set(truth))
        calls = [c for c in server.calls if c.query_id in truth]
        figures.calls = len(calls)
        per_process = Counter((c.epoch, c.query_id) for c in calls)
        figures.duplicated_calls = sum(
            1 for c in calls if c.query_id in committed_before[c.epoch]
        ) + sum(k - 1 for k in per_process.values() if k > 1)
        figures.recalled_after_kill = figures.calls - len(decided) - figures.duplicated_calls
        with engine.connect() as conn:
            figures.rewards_stored = conn.execute(
                sa.text("SELECT count(*) FROM decisions WHERE reward_seq IS NOT NULL")
            ).scalar_one()
            figures.duplicate_labels_counted = conn.execute(
                sa.text("SELECT coalesce(sum(duplicate_labels), 0) FROM decisions")
            ).scalar_one()
            final = latest_checkpoint(conn)
        figures.lost_rewards = n - figures.rewards_stored
        figures.final_checkpoint_updates = int(final.n_updates) if final else 0
        restored = restored_policy(engine)
        rebuilt = rebuild_policy(engine)
        figures.policy_updates = restored.live.policy.n_updates
        figures.double_applied_rewards = max(0, figures.policy_updates - figures.rewards_stored)
        figures.max_policy_difference = policy_difference(restored.live.policy, rebuilt)
        events = _decision_event_ids(bootstrap, topics["decisions_topic"])
        figures.decision_events_missing = len(set(truth) - set(events))
        figures.seconds = round(clock(), 1)
        return figures
    finally:
        stream.stop.set()
        for p in (proc, standby):
            if p.alive:
                p.kill()
        stream.join(timeout=10)
        server.kill()
        engine.dispose()
        delete_topics(bootstrap, topic_names)
