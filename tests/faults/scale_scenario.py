"""Several ``metallm serve`` instances in one consumer group on one database, scaled 1 → 3 → 2
while queries and their labels stream through, with kill -9 of a random instance at seeded
points (each restarted at once).

Every instance is a real ``metallm serve`` process (``tests/faults/serve.py``) with a name of
its own (``METALLM_INSTANCE_ID``: ``i00``, ``i01``… one per process, a restart is a new name)
and arm endpoints of its own on one :class:`~tests.faults.harness.ArmServer`, so every LLM
call is counted at the arm with the process that made it and the time it arrived. The topics
have several partitions, so the instances share the stream and hand partitions over at every
start, kill and stop. At the end every instance still running is stopped with SIGTERM; each
stop writes the instance's in-memory policy (``METALLM_TEST_POLICY_DUMP``), and each is
compared with one policy built by replaying the reward log in ``reward_seq`` order.

Each step of the plan (:func:`scale_plan`) waits for its point of progress, then for the fleet
to be settled: every instance serving, and both groups' rebalances of the last change over
(:meth:`Fleet.settled`); the stream publishes no new chunk meanwhile, so on a slow machine
the plan is not left behind. Only the start-up kill lands on purpose in the middle of a
start and its rebalance. (Without that wait, a SIGTERM stop overlapping the rebalance of the
instance started after a kill left a group, on Tansu, with every live member waiting in
JoinGroup for minutes — three runs in a row; its partitions were never consumed again.)

:func:`run` returns the figures; ``tests/faults/test_scale_out.py`` asserts on them and
``benchmarks/faults_report.py`` prints them.

What counts as a repeated LLM call: a query's decision names the instance that stored it and
its ``decided_at`` (taken after its call answered, before its transaction committed). Any
other call for that query reached the arm either before ``decided_at`` — a call cut off by a
kill (its process was killed before storing it) or by a rebalance (its partition was handed
over before it was stored) — or after it, which would be a call for a decision possibly
committed already. A killed process sent nothing after its kill, so a call of its is dated
no later than the kill. The scenario counts the first kind (allowed) and the second (must be
none).
"""

from __future__ import annotations

import base64
import json
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlalchemy as sa
from kafka import KafkaConsumer, TopicPartition

from consumers.kafka_io import create_topics, delete_topics
from service.log.checkpoints import latest_checkpoint
from service.log.transaction import rewards_after
from service.policy import loads
from service.settings import isolated_stream_names
from service.storage import make_engine
from tests.faults.harness import (
    POLICY_DUMP,
    ArmServer,
    ServiceProcess,
    Stopwatch,
    StreamProducer,
    arm_config,
    fresh_policy,
    make_queries,
    missing_work,
    policy_difference,
    progress,
    rebuild_policy,
    restored_policy,
    service_env,
    teach,
    wait_until,
    write_config,
)
from tests.faults.kill_scenario import ACCURACY, PRICES

PARTITIONS = 6
CHUNK = 100  # queries published at a time
CHUNKS_AHEAD = 2  # chunk i is published once chunk i - CHUNKS_AHEAD is decided
RESPAWN_DELAY_S = 1.0  # spares are spawned this far apart (their imports take the CPU)

DISCARDED_AT_REBALANCE = re.compile(r"(\d+) calls discarded at a rebalance")
DISCARDED_ELSEWHERE = re.compile(r"(\d+) calls discarded: their queries were decided elsewhere")
FOLLOWER_FAILED = "following the learning log failed"
ASSIGNED = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO consumers\.rebalance: (queries|labels): "
    r"assigned (.*)$",
    re.MULTILINE,
)


@dataclass
class Step:
    """One change to the fleet: ``scale_out`` (start ``count`` more instances), ``kill``
    (kill -9 a random instance, restart it), ``startup_kill`` (kill -9 the instance just
    restarted, ``delay`` s after its start, restart it), ``scale_in`` (SIGTERM a random
    instance, not replaced). All but ``startup_kill`` wait for progress ``at`` (decisions +
    rewards) and a settled fleet, then ``delay`` s."""

    kind: str
    at: int = 0
    delay: float = 0.0
    count: int = 1

    def __str__(self) -> str:
        if self.kind == "startup_kill":
            return f"startup_kill {self.delay:.2f} s after the restart"
        more = f" ×{self.count}" if self.count > 1 else ""
        return f"{self.kind}{more} at progress {self.at} (+{self.delay * 1000:.0f} ms)"


def scale_plan(n: int, kills: int, startup_kills: int, seed: int) -> list[Step]:
    """1 → 3 instances early (progress ~8 % of 2n), 3 → 2 by SIGTERM past the middle (~65 %),
    ``kills`` kill -9s spread over 15–92 % with seeded jitter, and ``startup_kills`` of them
    followed by a kill of the restarted instance while it starts."""
    rng = random.Random(seed)
    total = 2 * n
    plan = [
        Step("scale_out", at=int(total * rng.uniform(0.06, 0.10)), count=2),
        Step("scale_in", at=int(total * rng.uniform(0.60, 0.70)), delay=rng.uniform(0, 0.25)),
    ]
    lo, hi = 0.15 * total, 0.92 * total
    step = (hi - lo) / max(kills, 1)
    for k in range(kills):
        centre = lo + step * (k + 0.5)
        at = int(centre + rng.uniform(-step / 4, step / 4))
        plan.append(Step("kill", at=at, delay=rng.uniform(0.0, 0.25)))
    plan.sort(key=lambda s: s.at)
    kill_positions = [i for i, s in enumerate(plan) if s.kind == "kill"]
    for pos in sorted(rng.sample(kill_positions, min(startup_kills, kills)), reverse=True):
        plan.insert(pos + 1, Step("startup_kill", delay=rng.uniform(0.3, 2.0)))
    assert all(s.at < total for s in plan)
    return plan


@dataclass
class ScaleFigures:
    queries: int = 0
    partitions: int = PARTITIONS
    labels_published: int = 0
    early_labels: int = 0
    duplicate_labels_published: int = 0
    # the fleet
    max_instances: int = 0
    final_instances: int = 0
    processes_started: int = 0
    kills: int = 0
    restarts: int = 0
    scaled_out: int = 0  # instances added mid-stream
    scaled_in: int = 0  # instances stopped mid-stream (SIGTERM, not replaced)
    exit_codes: list[int] = field(default_factory=list)  # of every SIGTERM stop
    # decisions
    decisions: int = 0
    lost_decisions: int = 0
    unknown_decisions: int = 0
    deciding_instances: int = 0  # distinct ``instance`` values on the decisions
    decisions_without_seed: int = 0
    most_seeds_per_instance: int = 0  # rng_seed values one instance recorded (1: one per start)
    distinct_seeds: int = 0
    seed_mismatches: int = 0  # decisions whose rng_seed is not their instance's (policy dump)
    decision_events_missing: int = 0
    # LLM calls, counted at the arms
    calls: int = 0
    calls_after_decided: int = 0  # reached the arm after the decision was made: must be 0
    repeated_calls: int = 0  # calls - decisions: a query called again, before its decision
    repeated_after_kill: int = 0  # …whose first call was cut off by a kill
    repeated_after_rebalance: int = 0  # …by a rebalance (the caller lived on)
    discarded_at_rebalance_logged: int = 0  # metallm_calls_discarded{reason="rebalance"}
    discarded_elsewhere_logged: int = 0  # {reason="decided_elsewhere"}
    log_follower_failures: int = 0  # "following the learning log failed" in the logs
    # labels and rewards
    rewards_stored: int = 0
    lost_rewards: int = 0
    duplicate_reward_seqs: int = 0
    duplicate_labels_counted: int = 0
    labels_pending: int = 0
    labels_pending_beside_decision: int = 0
    # the policies
    policy_dumps: int = 0  # instances stopped cleanly whose policy was compared
    final_policies: int = 0  # of those, stopped at the end
    max_policy_difference: float = float("inf")  # final instances vs the log's replay
    max_stopped_policy_difference: float = float("inf")  # mid-stream stops vs the replay so far
    policy_update_mismatches: int = 0  # a dump's n_updates ≠ the rewards up to its watermark
    final_watermark_lag: int = 0  # rewards the final instances had not applied
    restored_policy_difference: float = float("inf")  # checkpoint + log vs the replay
    final_checkpoint_updates: int = 0
    seconds: float = 0.0
    steps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- Kafka
def committed_total(bootstrap: str, topic: str, group: str, partitions: int = PARTITIONS) -> int:
    """The offsets ``group`` committed, summed over the topic's partitions (= events consumed)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions))
    finally:
        consumer.close()


def event_keys(
    bootstrap: str, topic: str, partitions: int = PARTITIONS, timeout: float = 60.0
) -> Counter:
    """The keys of every event of a topic, every partition read to its high-water mark."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    seen: Counter = Counter()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                for message in records:
                    seen[(message.key or b"").decode()] += 1
            ends = {tp: consumer.highwater(tp) for tp in tps}
            if all(e is not None and consumer.position(tp) >= e for tp, e in ends.items()):
                return seen
        raise AssertionError(f"could not read {topic} to its end within {timeout} s")
    finally:
        consumer.close()


# --------------------------------------------------------------------------- the fleet
class Fleet:
    """The service processes: those serving, by instance name, and warm spares to start."""

    def __init__(self, base_env: dict[str, str], server: ArmServer, workdir: Path) -> None:
        self.base_env = base_env
        self.server = server
        self.workdir = workdir
        self.spawned = 0
        self.live: dict[str, ServiceProcess] = {}
        self.spares: list[tuple[str, ServiceProcess]] = []
        self.killed: dict[str, float] = {}  # name → time.time() of its kill -9
        self.stopped: dict[str, int] = {}  # name → exit code of its SIGTERM stop
        self.started = 0
        self._respawn_at = 0.0
        self._serving: set[str] = set()
        self.changed_at = 0.0  # time.time() of the last start, kill or stop

    def dump_path(self, name: str) -> Path:
        return self.workdir / f"policy-{name}.json"

    def spawn(self) -> None:
        """A standby process (imports done, not serving) with a name of its own."""
        name = f"i{self.spawned:02d}"
        self.spawned += 1
        config = write_config(
            self.workdir / f"metallm-{name}.yaml", arm_config(self.server, PRICES, caller=name)
        )
        env = {
            **self.base_env,
            "METALLM_INSTANCE_ID": name,
            "METALLM_CONFIG": str(config),
            POLICY_DUMP: str(self.dump_path(name)),
        }
        process = ServiceProcess(env, self.workdir / f"service-{name}.log", standby=True)
        self.spares.append((name, process.start()))

    def start(self) -> str:
        """Start a spare serving (a cold one if none is left) and return its name."""
        if not self.spares:
            self.spawn()
        name, process = self.spares.pop(0)
        self.live[name] = process.go()
        self.changed_at = time.time()
        self.started += 1
        return name

    def tend(self, wanted: int) -> None:
        """Have ``wanted`` warm spares, each spawned once every instance started is serving
        (and a little after the last spawn), so that their imports (~3 s of CPU) do not take
        the CPU from a start."""
        if (
            len(self.spares) < wanted
            and time.monotonic() >= self._respawn_at
            and self.serving(list(self.live))
        ):
            self.spawn()
            self._respawn_at = time.monotonic() + RESPAWN_DELAY_S

    def kill(self, name: str) -> None:
        process = self.live.pop(name)
        process.kill()
        self.killed[name] = self.changed_at = time.time()

    def terminate(self, names: list[str], timeout: float = 60.0) -> None:
        """SIGTERM these instances at once and wait for each to exit."""
        processes = [(name, self.live.pop(name)) for name in names]
        self.changed_at = time.time()  # their consumers leave the groups before they exit
        for _, process in processes:
            process.process.send_signal(signal.SIGTERM)
        for name, process in processes:
            try:
                self.stopped[name] = process.process.wait(timeout=timeout)
            except Exception:
                process.kill()
                raise AssertionError(f"{name} ignored SIGTERM for {timeout} s") from None

    def serving(self, names: list[str]) -> bool:
        """Whether these instances are serving (past start-up, their signal handlers set)."""
        for name in set(names) - self._serving:
            if not self.live[name].serving:
                return False
            self._serving.add(name)
        return True

    def settled(self) -> bool:
        """Whether every instance serves and both groups' rebalances since the last change
        of the fleet are over: each instance logged an assignment after it, and together
        those cover every partition once (see the module's docstring)."""
        names = sorted(self.live)
        if not self.serving(names):
            return False
        latest: dict[tuple[str, str], tuple[float, list[int]]] = {}
        for name in names:
            for stamp, ms, group, parts in ASSIGNED.findall(self.live[name].log()):
                at = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
                latest[(name, group)] = (at, [int(p) for p in re.findall(r"\[(\d+)\]", parts)])
        for group in ("queries", "labels"):
            mine = [latest.get((name, group)) for name in names]
            if any(m is None or m[0] < self.changed_at for m in mine):
                return False
            parts = sorted(p for _, ps in mine for p in ps)  # type: ignore[misc]
            if parts != list(range(PARTITIONS)):
                return False
        return True

    def all_alive(self) -> bool:
        return all(p.alive for p in self.live.values())

    def exited(self) -> str:
        """What a process that exited by itself logged last."""
        dead = [(n, p) for n, p in self.live.items() if not p.alive]
        return "\n".join(f"--- {n} exited:\n{p.log()[-3000:]}" for n, p in dead)

    def dump_stacks(self) -> str:
        """Have every live instance write its threads' stacks to its log (SIGUSR1); names."""
        for process in self.live.values():
            if process.alive:
                process.process.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        return f"(thread stacks of {', '.join(sorted(self.live))} are in their logs)"

    def logs(self) -> list[str]:
        return [p.read_text(errors="replace") for p in sorted(self.workdir.glob("service-*.log"))]

    def close(self) -> None:
        for process in [*self.live.values(), *(p for _, p in self.spares)]:
            process.kill()


# --------------------------------------------------------------------------- the run
def replay(engine: sa.Engine, upto: int) -> tuple[object, int]:
    """A fresh policy fed the log's rewards with seq ≤ ``upto``, in order; and how many."""
    policy = fresh_policy()
    applied = 0
    with engine.connect() as conn:
        for r in rewards_after(conn, 0):
            if r.seq > upto:
                break
            teach(policy, r)
            applied += 1
    return policy, applied


def run(
    bootstrap: str,
    database_url: str,
    schema: str,
    workdir: Path,
    n: int = 3000,
    kills: int = 4,
    startup_kills: int = 1,
    seed: int = 16,
    poll_max_records: int = 25,
    checkpoint_every: int = 37,
    say: Callable[[str], None] = lambda _: None,
) -> ScaleFigures:
    clock = Stopwatch()
    figures = ScaleFigures(queries=n)
    queries = make_queries(n, seed=seed)
    truth = {q.query_id: q for q in queries}
    topics = isolated_stream_names(f"scale-{uuid.uuid4().hex[:8]}")
    topic_names = [v for k, v in topics.items() if k.endswith("_topic")]
    create_topics(bootstrap, topic_names, PARTITIONS)
    engine = make_engine(database_url, schema)
    server = ArmServer(truth, ACCURACY, parse_errors=0.02).start()
    env = service_env(
        bootstrap,
        topics,
        database_url,
        schema,
        workdir / "unused.yaml",  # each process has a config of its own (Fleet.spawn)
        poll_max_records=poll_max_records,
        labels_poll_max_records=poll_max_records,  # small label batches too: kills land amid them
        checkpoint_every=checkpoint_every,
        checkpoint_min_seconds=0,  # a checkpoint every checkpoint_every rewards, kills between
        log_poll_seconds=1.0,
    )
    fleet = Fleet(env, server, workdir)
    hold = threading.Event()  # set: no new chunk (the fleet is catching up with the plan)

    def may_publish(i: int) -> bool:  # each chunk once the chunk CHUNKS_AHEAD before it is decided
        return not hold.is_set() and progress(engine)[0] >= CHUNK * (i - CHUNKS_AHEAD + 1)

    stream = StreamProducer(bootstrap, topics, queries, CHUNK, seed + 1, figures, may_publish)

    def moved() -> int:
        decided, rewarded, _ = progress(engine)
        return decided + rewarded

    plan = scale_plan(n, kills, startup_kills, seed)
    figures.steps = [str(s) for s in plan]
    next_step = 0

    def starts_ahead() -> int:
        """Processes the next step that starts any will start (with the start-up kills right
        after it): the spares to have ready."""
        for i in range(next_step, len(plan)):
            if plan[i].kind in ("scale_out", "kill"):
                after = plan[i + 1 :]
                trailing = next((j for j, s in enumerate(after) if s.kind != "startup_kill"), None)
                return plan[i].count + (len(after) if trailing is None else trailing)
        return 0

    def alive() -> bool:
        fleet.tend(starts_ahead())
        if not fleet.all_alive():
            raise AssertionError(f"an instance exited by itself:\n{fleet.exited()}")
        return not stream.errors

    def explain() -> str:
        return f"{missing_work(engine, truth)}\n{fleet.dump_stacks()}"

    def wait_serving(names: list[str]) -> None:
        wait_until(lambda: fleet.serving(names), 60, f"{', '.join(names)} serving", alive=alive)

    victims = random.Random(seed + 2)
    first = fleet.start()  # the spares follow (Fleet.tend), once it has imported
    say(f"started {first}")
    figures.max_instances = 1
    stream.start()
    try:
        restarted = first
        for next_step, step in enumerate(plan):  # noqa: B007 - starts_ahead() reads it
            if step.kind == "startup_kill":
                time.sleep(step.delay)
            else:
                target = min(max(step.at, moved() + 20), 2 * n)
                wait_until(
                    lambda t=target: moved() >= t,
                    timeout=120,
                    message=f"progress {target}",
                    interval=0.05,
                    alive=alive,
                    explain=explain,
                )
                # each step finds the fleet settled (every instance serving, the rebalances of
                # the last change over); meanwhile the stream waits (no new chunk) rather
                # than leave the plan behind on a slow machine
                hold.set()
                try:
                    wait_until(fleet.settled, 90, "the fleet settled", 0.2, alive, explain)
                finally:
                    hold.clear()
                time.sleep(step.delay)
            alive()
            if step.kind == "scale_out":
                names = [fleet.start() for _ in range(step.count)]
                figures.scaled_out += step.count
                say(f"{step}: started {', '.join(names)} → {len(fleet.live)} instances")
            elif step.kind == "scale_in":
                name = victims.choice(sorted(fleet.live))
                fleet.terminate([name])
                figures.scaled_in += 1
                say(f"{step}: stopped {name} (exit {fleet.stopped[name]}) → {len(fleet.live)}")
            else:
                if step.kind == "startup_kill" and restarted in fleet.live:
                    name = restarted  # whatever it is doing: importing, restoring, joining
                else:  # one that is serving: a kill mid-stream, not one during start-up
                    name = victims.choice(sorted(fleet.live))
                fleet.kill(name)
                figures.kills += 1
                restarted = fleet.start()
                figures.restarts += 1
                say(f"{step}: killed {name}, started {restarted} ({moved()} moved)")
            figures.max_instances = max(figures.max_instances, len(fleet.live))
        next_step = len(plan)  # no spares wanted any more
        wait_until(
            lambda: stream.done.is_set() and progress(engine) == (n, n, 0),
            timeout=150,
            message=f"{n} decisions with their rewards",
            alive=alive,
            explain=explain,
        )
        wait_until(
            lambda: (
                committed_total(bootstrap, topics["queries_topic"], topics["queries_group"]) == n
                and committed_total(bootstrap, topics["labels_topic"], topics["labels_group"])
                == figures.labels_published
            ),
            timeout=60,
            message="every event consumed",
            interval=0.5,
            alive=alive,
        )
        if stream.errors:
            raise stream.errors[0]
        final = sorted(fleet.live)
        figures.final_instances = len(final)
        wait_serving(final)
        fleet.terminate(final)
        figures.processes_started = fleet.started
        figures.exit_codes = [fleet.stopped[name] for name in sorted(fleet.stopped)]
        say(f"stopped {', '.join(final)}: exit codes {figures.exit_codes}")
        _count(figures, engine, server, fleet, truth, final)
        figures.decision_events_missing = len(
            set(truth) - set(event_keys(bootstrap, topics["decisions_topic"]))
        )
        figures.seconds = round(clock(), 1)
        return figures
    finally:
        stream.stop.set()
        fleet.close()
        stream.join(timeout=10)
        server.kill()
        engine.dispose()
        delete_topics(bootstrap, topic_names)


def _count(
    figures: ScaleFigures,
    engine: sa.Engine,
    server: ArmServer,
    fleet: Fleet,
    truth: dict,
    final: list[str],
) -> None:
    """What happened, from Postgres, the arm server's call log and the policy dumps."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT query_id, instance, rng_seed, decided_at, reward_seq FROM decisions")
        ).all()
        figures.duplicate_labels_counted = conn.execute(
            sa.text("SELECT coalesce(sum(duplicate_labels), 0) FROM decisions")
        ).scalar_one()
        figures.labels_pending = conn.execute(
            sa.text("SELECT count(*) FROM pending_labels")
        ).scalar_one()
        figures.labels_pending_beside_decision = conn.execute(
            sa.text("SELECT count(*) FROM pending_labels JOIN decisions USING (query_id)")
        ).scalar_one()
        checkpoint = latest_checkpoint(conn)
    decided = {r.query_id: r for r in rows}
    figures.decisions = len(decided)
    figures.lost_decisions = len(set(truth) - set(decided))
    figures.unknown_decisions = len(set(decided) - set(truth))
    figures.deciding_instances = len({r.instance for r in rows})
    figures.decisions_without_seed = sum(1 for r in rows if r.rng_seed is None)
    seeds: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        seeds[r.instance].add(r.rng_seed)
    figures.most_seeds_per_instance = max((len(s) for s in seeds.values()), default=0)
    figures.distinct_seeds = len({r.rng_seed for r in rows})
    reward_seqs = [r.reward_seq for r in rows if r.reward_seq is not None]
    figures.rewards_stored = len(reward_seqs)
    figures.lost_rewards = figures.queries - figures.rewards_stored
    figures.duplicate_reward_seqs = len(reward_seqs) - len(set(reward_seqs))
    last_seq = max(reward_seqs, default=0)
    figures.final_checkpoint_updates = int(checkpoint.n_updates) if checkpoint else 0

    # -- the calls -------------------------------------------------------------------------
    calls = [c for c in server.calls if c.query_id in truth]
    figures.calls = len(calls)
    figures.repeated_calls = len(calls) - len(decided)
    by_query: dict[str, list] = defaultdict(list)
    for c in calls:
        by_query[c.query_id].append(c)
    for qid, made in by_query.items():
        decision = decided.get(qid)
        at = decision.decided_at.timestamp() if decision is not None else float("inf")
        made.sort(key=lambda c: c.wall)
        # sent no later than it reached the arm, nor than its process was killed
        sent = [min(c.wall, fleet.killed.get(c.caller or "", float("inf"))) for c in made]
        used = max(
            (
                i
                for i, c in enumerate(made)
                if decision is not None and c.caller == decision.instance and sent[i] <= at
            ),
            default=None,
        )
        for i, c in enumerate(made):
            if i == used:
                continue
            if sent[i] > at:
                figures.calls_after_decided += 1
            elif fleet.killed.get(c.caller or "", float("inf")) <= at:
                figures.repeated_after_kill += 1  # its caller died before the decision
            else:
                figures.repeated_after_rebalance += 1  # its caller lived on without it
    for text in fleet.logs():
        figures.discarded_at_rebalance_logged += sum(
            int(m) for m in DISCARDED_AT_REBALANCE.findall(text)
        )
        figures.discarded_elsewhere_logged += sum(int(m) for m in DISCARDED_ELSEWHERE.findall(text))
        figures.log_follower_failures += text.count(FOLLOWER_FAILED)

    # -- the policies ----------------------------------------------------------------------
    rebuilt = rebuild_policy(engine)
    final_worst = stopped_worst = 0.0
    for name in sorted(fleet.stopped):
        path = fleet.dump_path(name)
        if not path.exists():
            final_worst = stopped_worst = float("inf")  # a clean stop that wrote nothing
            continue
        dump = json.loads(path.read_text())
        figures.policy_dumps += 1
        policy = loads(base64.b64decode(dump["state"]))
        for r in rows:
            if r.instance == name and r.rng_seed != dump["rng_seed"]:
                figures.seed_mismatches += 1
        if name in final:
            figures.final_policies += 1
            lag = last_seq - dump["watermark"]
            figures.final_watermark_lag = max(figures.final_watermark_lag, lag)
            if dump["n_updates"] != figures.rewards_stored:
                figures.policy_update_mismatches += 1
            final_worst = max(final_worst, policy_difference(policy, rebuilt))
        else:
            expected, applied = replay(engine, dump["watermark"])
            if dump["n_updates"] != applied:
                figures.policy_update_mismatches += 1
            stopped_worst = max(stopped_worst, policy_difference(policy, expected))
    figures.max_policy_difference = final_worst
    figures.max_stopped_policy_difference = stopped_worst
    restored = restored_policy(engine)
    try:
        figures.restored_policy_difference = policy_difference(restored.live.policy, rebuilt)
    finally:
        restored.close()
