"""The learning log's ceiling (issue 24): how long a decision batch and a label batch hold the
log's lock, and so the most decisions/s and labels/s all instances together can reach.

Every transaction that gives out ``decision_seq`` or ``reward_seq`` values takes the one
advisory lock of the learning log (``lock_learning_log``) and holds it to COMMIT, on
every instance: the log is a single writer at a time, whatever the number of instances. This
script runs the service's locked transactions on the real Postgres, in a schema of its own,
through the same learning-log functions, in the same order, as ``service/pipeline.py``:

- a **decision batch**: 64 decisions (``METALLM_POLL_MAX_RECORDS``' default), each with a
  context of the default layout (d = 450: bias, length, 64 task buckets, a 384-dim embedding):
  lock, catch up on the decision log, ``store_decisions`` (insert, failure rewards, early
  labels), commit (``Decider.decide``);
- a **label batch**: 1,000 labels (``METALLM_LABELS_POLL_MAX_RECORDS``' default) of decisions
  stored before, from 3 partitions: lock, catch up, the group's applied offsets, the decisions
  (locked), waiting labels, the join, ``apply_plan`` (labels, rewards, the new offsets), commit
  (``Learner.learn``).

It times, per transaction, the **hold**: from the lock granted (``lock_learning_log``
returned) to COMMIT returned, and the **wait** before it (transaction start → lock granted).
For each kind, one writer running ``--repeats`` transactions back to back (after 2
unmeasured), and 2 writer processes at once (two instances) running ``--repeats`` / 2 each,
to show the serialisation: one's wait is the other's hold, and both together commit no more
transactions a second than the lock's hold allows. Each run starts on a freshly vacuumed table
(:func:`settle`); ``--rounds`` rounds, one writer and two alternating first, pooled.

The ceiling printed is ``batch size / median hold`` of one writer: the most decisions/s (only
decisions) and labels/s (only labels) all instances together can reach; decisions and labels
share the lock, so together ``decisions/s ÷ D + labels/s ÷ L ≤ 1``.

The policy update after COMMIT (``LearningLog.stored``) and the LLM calls are outside the lock
and not timed here. Postgres shares the machine's cores with the writers (and with anyone
else's runs: the load average is printed).

    .venv/bin/python benchmarks/log_ceiling.py                  # ~5 minutes
    .venv/bin/python benchmarks/log_ceiling.py --rounds 1 --repeats 10 --no-write

Needs Postgres (``METALLM_TEST_DATABASE_URL``, default postgresql://postgres@127.0.0.1/test);
works in a schema of its own, dropped at the end. Writes ``benchmarks/results/log_ceiling.md``.

The learning-log calls (``service.log``): ``lock_learning_log``, ``decision_log``,
``store_decisions``, ``insert_decisions`` (to store the labelled decisions first),
``redelivered``, ``decisions_for_labels``, ``waiting_labels``, ``join_labels``,
``apply_plan``; with ``service.storage``'s ``make_engine`` and ``vector_to_bytes``,
``service.reward.RewardSettings``, ``service.migrate.upgrade`` / ``drop_schema``. They are
imported in :func:`log_api` and :func:`score_api` only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scale_out import commit, cpu_model, load, quantile  # noqa: E402

DATABASE_URL = os.environ.get(
    "METALLM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
DECISION_BATCH = 64
LABEL_BATCH = 1000
EMBEDDING_DIM = 384
LABEL_PARTITIONS = 3  # of one writer's poll (the label consumer's 6, split over 2 instances)
GROUP = "log-ceiling"
TOPIC = "labels"
WARMUP = 2
RESULTS = ROOT / "benchmarks" / "results" / "log_ceiling.md"
TEXT = "the acting was fine but the plot dragged on for far too long, said the review"


# ------------------------------------------------------------------------ the service's calls
def log_api():
    """The module of the learning-log calls the transactions below make: the one place to
    retarget when they move (the calls used are listed in the module docstring)."""
    from service.log import decisions, labels, transaction
    from service.log.join import join_labels
    from service.storage import make_engine, vector_to_bytes

    return SimpleNamespace(
        make_engine=make_engine,
        vector_to_bytes=vector_to_bytes,
        lock_learning_log=transaction.lock_learning_log,
        decision_log=transaction.decision_log,
        store_decisions=decisions.store_decisions,
        insert_decisions=decisions.insert_decisions,
        redelivered=labels.redelivered,
        decisions_for_labels=labels.decisions_for_labels,
        waiting_labels=labels.waiting_labels,
        apply_plan=labels.apply_plan,
        join_labels=join_labels,
    )


def score_api() -> SimpleNamespace:
    from service.events import LabelEvent
    from service.reward import RewardSettings

    return SimpleNamespace(settings=RewardSettings(0.0, 1e-3), label=LabelEvent)


@dataclass(frozen=True)
class Timing:
    """One locked transaction: waiting for the lock, then holding it (to COMMIT returned)."""

    wait_s: float
    hold_s: float
    ended: float  # perf_counter at COMMIT returned


# ------------------------------------------------------------------------ data
def contexts(n: int, seed: int) -> list[bytes]:
    """``n`` contexts of the default layout (d = 450) as the decider stores them."""
    import numpy as np

    from service.context import DEFAULT_EMBEDDING, ContextBuilder

    api = log_api()
    builder = ContextBuilder.for_tasks({}, DEFAULT_EMBEDDING)
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, EMBEDDING_DIM)).astype(np.float32)
    return [api.vector_to_bytes(builder.build("sentiment", TEXT, None, e)) for e in embeddings]


def decisions(tag: str, start: int, n: int, seed: int) -> list:
    """``n`` typed decisions as the decider builds them (every column it writes)."""
    from service.context import DEFAULT_EMBEDDING, ContextBuilder
    from service.decision import Decision

    layout = ContextBuilder.for_tasks({}, DEFAULT_EMBEDDING).spec
    now = dt.datetime.now(dt.UTC)
    return [
        Decision(
            query_id=f"{tag}-{i}",
            task="sentiment",
            text=f"{TEXT} ({tag}-{i})",
            options=["positive", "negative"],
            metadata=None,
            sent_at=now,
            decided_at=now,
            arm="small" if i % 3 else "large",
            propensity=0.9,
            probabilities={"small": 0.9, "large": 0.1},
            policy="linucb",
            status="ok",
            prediction="positive",
            raw_output="positive",
            error=None,
            input_tokens=40,
            output_tokens=1,
            cost_usd=4.4e-6,
            latency_ms=210.0,
            attempts=1,
            fallback_arm=None,
            answer_scores=None,
            arm_scores={"small": 0.71, "large": 0.64},
            embedding_model="all-MiniLM-L6-v2",
            context=context,
            context_layout=layout,
            kafka_partition=i % 6,
            kafka_offset=i,
            instance="log-ceiling",
            rng_seed=0,
        )
        for i, context in zip(range(start, start + n), contexts(n, seed + start), strict=True)
    ]


def prestore(engine, tag: str, n: int, chunk: int = 2000) -> None:
    """Store ``n`` unlabelled decisions (ids ``{tag}-0`` …) for the label batches."""
    api = log_api()
    for start in range(0, n, chunk):
        with engine.begin() as conn:
            api.insert_decisions(conn, decisions(tag, start, min(chunk, n - start), seed=1))


def settle(engine) -> None:
    """VACUUM ANALYZE the decisions, so that every run starts from a table as autovacuum
    keeps it, not amid its work on the run before (a label run updates 50,000 rows). Without
    statistics (a table filled a moment ago) the planner reads the decision log
    (``decision_seq > watermark``) by a scan of the whole table instead of its index: ~20 ms
    a transaction at 20,000 rows, growing with the table."""
    import sqlalchemy as sa

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE decisions"))


# ------------------------------------------------------------------------ the transactions
class Writer:
    """One instance's side of the log: its engine, its watermark, its label offsets."""

    def __init__(self, schema: str, name: str, partitions: list[int]) -> None:
        self.api, self.score = log_api(), score_api()
        self.engine = self.api.make_engine(DATABASE_URL, schema)
        self.name = name
        self.partitions = partitions
        self.watermark = 0  # decision_seq this writer has observed up to
        self.offsets = dict.fromkeys(partitions, 0)

    def _catch_up(self, conn) -> None:
        logged = self.api.decision_log(conn, after=self.watermark)
        if logged:
            self.watermark = logged[-1].seq

    def decide(self, batch: list) -> Timing:
        """``Decider.decide``'s transaction for one batch."""
        began = time.perf_counter()
        with self.engine.begin() as conn:
            self.api.lock_learning_log(conn, self.name)
            locked = time.perf_counter()
            self._catch_up(conn)
            stored = self.api.store_decisions(conn, batch, [], self.score.settings)
        ended = time.perf_counter()
        if len(stored.inserted) != len(batch):
            raise RuntimeError(f"stored {len(stored.inserted)} of {len(batch)} decisions")
        self.watermark = max(self.watermark, *stored.inserted.values())
        return Timing(locked - began, ended - locked, ended)

    def learn(self, ids: list[str]) -> Timing:
        """``Learner.learn``'s transaction for one poll of labels (none redelivered, none
        early, none duplicate: the common case)."""
        now = dt.datetime.now(dt.UTC)
        labels = [
            self.score.label(query_id=q, label="positive" if i % 4 else "negative", labeled_at=now)
            for i, q in enumerate(ids)
        ]
        sources = []
        for i in range(len(labels)):
            p = self.partitions[i % len(self.partitions)]
            sources.append((TOPIC, p, self.offsets[p]))
            self.offsets[p] += 1
        began = time.perf_counter()
        with self.engine.begin() as conn:
            self.api.lock_learning_log(conn, self.name)
            locked = time.perf_counter()
            self._catch_up(conn)
            redelivered = self.api.redelivered(conn, GROUP, sources)
            found = self.api.decisions_for_labels(conn, ids)
            waiting = self.api.waiting_labels(conn, [q for q in ids if q not in found])
            plan = self.api.join_labels(labels, found, waiting, redelivered, self.score.settings)
            stats = self.api.apply_plan(conn, plan, GROUP, sources)
        ended = time.perf_counter()
        if len(stats.rewards) != len(ids):
            raise RuntimeError(f"stored {len(stats.rewards)} rewards for {len(ids)} labels")
        return Timing(locked - began, ended - locked, ended)

    def close(self) -> None:
        self.engine.dispose()


# ------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Job:
    """One writer's share of a run: ``repeats`` measured transactions after ``warmup``."""

    schema: str
    kind: str  # "decisions" or "labels"
    writer: int
    repeats: int
    warmup: int
    label_start: int  # first index of this writer's stored decisions (labels only)
    tag: str
    start_at: float  # time.time() at which to start (writers start together)


def run_job(job: Job) -> list[Timing]:
    parts = list(range(job.writer * LABEL_PARTITIONS, (job.writer + 1) * LABEL_PARTITIONS))
    writer = Writer(job.schema, f"writer-{job.writer}", parts)
    try:
        n = job.warmup + job.repeats
        if job.kind == "decisions":
            tag = f"{job.tag}-d{job.writer}-{uuid.uuid4().hex[:6]}"
            batches = [decisions(tag, i * DECISION_BATCH, DECISION_BATCH, 2) for i in range(n)]
            step = lambda i: writer.decide(batches[i])  # noqa: E731
        else:
            ids = [f"{job.tag}-{job.label_start + i}" for i in range(n * LABEL_BATCH)]
            step = lambda i: writer.learn(ids[i * LABEL_BATCH : (i + 1) * LABEL_BATCH])  # noqa: E731
        for i in range(job.warmup):
            step(i)
        time.sleep(max(0.0, job.start_at - time.time()))
        return [step(job.warmup + i) for i in range(job.repeats)]
    finally:
        writer.close()


@dataclass(frozen=True)
class Run:
    kind: str
    writers: int
    timings: list[Timing]
    seconds: float  # first measured transaction's start → last COMMIT, all writers (summed)
    rates: tuple[float, ...] = ()  # committed/s of each round pooled in

    @classmethod
    def pooled(cls, runs: list[Run]) -> Run:
        """The rounds of one configuration as one run (their transactions and times)."""
        return cls(
            runs[0].kind,
            runs[0].writers,
            [t for r in runs for t in r.timings],
            sum(r.seconds for r in runs),
            tuple(r.per_second for r in runs),
        )

    @property
    def batch(self) -> int:
        return DECISION_BATCH if self.kind == "decisions" else LABEL_BATCH

    def hold(self, q: float) -> float:
        return quantile([t.hold_s for t in self.timings], q)

    def wait(self, q: float) -> float:
        return quantile([t.wait_s for t in self.timings], q)

    @property
    def per_second(self) -> float:
        """Transactions committed a second, all writers together."""
        return len(self.timings) / self.seconds

    @property
    def busy(self) -> float:
        """The share of the run's time the lock was held."""
        return sum(t.hold_s for t in self.timings) / self.seconds


def run(schema: str, tag: str, kind: str, writers: int, repeats: int, label_start: int) -> Run:
    """``writers`` processes at once, ``repeats`` measured transactions each."""
    start_at = time.time() + 3.0 + 2.0 * writers  # after every writer's set-up and warm-up
    jobs = [
        Job(
            schema,
            kind,
            w,
            repeats,
            WARMUP,
            label_start + w * (WARMUP + repeats) * LABEL_BATCH,
            tag,
            start_at,
        )
        for w in range(writers)
    ]
    with multiprocessing.get_context("spawn").Pool(writers) as pool:
        results = pool.map(run_job, jobs)
    timings = [t for r in results for t in r]
    first = min(r[0].ended - r[0].hold_s - r[0].wait_s for r in results)
    last = max(t.ended for t in timings)
    return Run(kind, writers, timings, last - first)


def label_rows_per_round(repeats: int, concurrent: int) -> int:
    return ((WARMUP + repeats) + 2 * (WARMUP + concurrent)) * LABEL_BATCH


def measure(schema: str, engine, tag: str, args) -> list[Run]:
    """``args.rounds`` rounds of the four configurations, one writer and two alternating
    first (other people's work on the machine comes and goes), pooled per configuration."""
    per_round = label_rows_per_round(args.repeats, args.concurrent)
    done: dict[tuple[str, int], list[Run]] = {}
    for i in range(args.rounds):
        base = i * per_round  # the round's stored decisions: one writer's, then the two's
        order = [
            (1, args.repeats, base),
            (2, args.concurrent, base + (WARMUP + args.repeats) * LABEL_BATCH),
        ]
        if i % 2:
            order.reverse()
        for kind in ("decisions", "labels"):
            for writers, repeats, start in order:
                settle(engine)
                r = run(schema, tag, kind, writers, repeats, start)
                done.setdefault((kind, writers), []).append(r)
                print(
                    f"round {i + 1}: {r.batch:>5} {kind:<9} {writers} writer(s): hold p50 "
                    f"{ms(r.hold(0.5))} ms, p99 {ms(r.hold(0.99))} ms; wait p50 "
                    f"{ms(r.wait(0.5))} ms; {r.per_second:.1f} committed/s, lock busy "
                    f"{100 * r.busy:.0f} %; load {load()}",
                    flush=True,
                )
    return [Run.pooled(runs) for runs in done.values()]


# ------------------------------------------------------------------------ report
def ms(x: float) -> str:
    return f"{1000 * x:.1f}"


def report(runs: list[Run], args, started: str, load_start: str, table_rows: int) -> str:
    single = {r.kind: r for r in runs if r.writers == 1}
    lines = [
        "# The learning log's ceiling: `benchmarks/log_ceiling.py`",
        "",
        f"Run of {started} at commit {commit()}, {os.cpu_count()} cores ({cpu_model()}), "
        f"Python {platform.python_version()}, Postgres on the same machine; load average at "
        f"the start {load_start}, at the end {load()}. Decision batches of {DECISION_BATCH} "
        f"(context d = 450, the default layout), label batches of {LABEL_BATCH:,}; "
        f"{args.rounds} rounds (one writer and two alternating first), each of "
        f"{args.repeats} transactions with one writer and {args.concurrent} each with two, "
        f"pooled; {table_rows:,} decisions in the table at the end.",
        "",
        "Hold: the learning log's lock granted → COMMIT returned. Wait: transaction start → "
        "lock granted. Committed/s: transactions of all writers together a second; busy: "
        "the sum of the holds over the runs' time (committed/s of each round after it). "
        "Both are seen from the writer: Postgres releases the lock before the writer sees "
        "COMMIT return, and another writer may be granted it in between, so with two writers "
        "busy can pass 100 % (by a round trip and the scheduling delays of a loaded machine "
        "per transaction).",
        "",
        "| batch | writers | hold p50 | hold p99 | wait p50 | wait p99 | committed/s | busy "
        "| rounds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.batch:,} {r.kind} | {r.writers} | {ms(r.hold(0.5))} ms | {ms(r.hold(0.99))} ms"
            f" | {ms(r.wait(0.5))} ms | {ms(r.wait(0.99))} ms | {r.per_second:.1f} | "
            f"{100 * r.busy:.0f} % | {', '.join(f'{x:.1f}' for x in r.rates)} |"
        )
    d, lab = single["decisions"], single["labels"]
    double = {r.kind: r for r in runs if r.writers == 2}

    def ratio(kind: str) -> str:
        return f"{double[kind].per_second / single[kind].per_second:.2f}"

    def hold_ratio(kind: str) -> str:
        return f"{double[kind].hold(0.5) / single[kind].hold(0.5):.2f}"

    lines += [
        "",
        "## The ceiling",
        "",
        "One lock per log, held for the median hold of one writer: whatever the number of "
        "instances,",
        "",
        f"- **at most {d.batch / d.hold(0.5):,.0f} decisions/s** ({d.batch} per "
        f"{ms(d.hold(0.5))} ms; {d.batch / d.hold(0.99):,.0f}/s at the p99 hold), when the "
        "log takes only decisions;",
        f"- **at most {lab.batch / lab.hold(0.5):,.0f} labels/s** ({lab.batch:,} per "
        f"{ms(lab.hold(0.5))} ms; {lab.batch / lab.hold(0.99):,.0f}/s at the p99 hold), when "
        "it takes only labels;",
        f"- both at once share the lock: decisions/s ÷ {d.batch / d.hold(0.5):,.0f} + "
        f"labels/s ÷ {lab.batch / lab.hold(0.5):,.0f} ≤ 1.",
        "",
        "With two writers the lock is busy almost all the time and each transaction waits "
        "about one hold of the other's: the two instances together commit "
        f"{ratio('decisions')}× one writer's decision transactions a second and "
        f"{ratio('labels')}× its label transactions, not twice as many (their median holds "
        f"are {hold_ratio('decisions')}× and {hold_ratio('labels')}× one writer's; with two, "
        "a decision transaction first reads the other's decisions from the log, the "
        "catch-up that keeps λ and the context statistics the log's). Smaller "
        "batches (a poll that brings fewer records) pay the per-transaction cost (lock, "
        "round trips, COMMIT's flush) for fewer rows and lower the ceiling in rows/s.",
        "",
        "## Beyond the ceiling",
        "",
        "Partition the learning log: one log per task, or per hash range of query ids (the "
        "Kafka partition key), each with its own advisory lock, its own `decision_seq` and "
        "`reward_seq` sequences and its own watermarks. A query's decision and its label "
        "land in the same log (both are keyed by `query_id`), so the exactly-once join stays "
        "inside one lock; transactions of different logs no longer wait for each other, and "
        "the ceiling grows with the number of logs (until Postgres' own CPU or WAL flushes "
        "are the limit).",
        "",
        "Every instance still learns one policy: it follows every log and applies each log's "
        "rewards in that log's order. The policy's statistics add exactly across logs "
        "because they are sufficient statistics that are sums over rewards: per arm, a linear "
        "policy keeps `A = ridge·I + Σ x xᵀ` and `b = Σ r x` (and the counts); a sum does "
        "not depend on the order of its terms nor on how they are grouped, so the statistics "
        "of the union of the logs are the sums of each log's (what `policy.merge` already "
        "computes for two policies), and interleaving the logs in any order gives the same "
        "`A` and `b` up to floating-point rounding. The order-dependent parts are not sums: "
        "the budget pacer's λ is a controller over the decisions' costs in commit order, "
        "and the context builder's running standardisation shapes each context when it is "
        "built. Each log keeps its own (λ per log with its share of the budget, or one "
        "pacer fed from a merged spend), and a reward's context is stored with its decision, "
        "so learning needs nothing from another log.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="transactions a round, one writer")
    parser.add_argument(
        "--concurrent", type=int, default=None, help="transactions a round per writer, two"
    )
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS}")
    args = parser.parse_args()
    args.concurrent = args.concurrent or max(1, args.repeats // 2)
    from service.migrate import drop_schema, upgrade

    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_start = load()
    tag = uuid.uuid4().hex[:8]
    schema = f"log_ceiling_{tag}"
    upgrade(DATABASE_URL, schema)
    try:
        engine = log_api().make_engine(DATABASE_URL, schema)
        n = args.rounds * label_rows_per_round(args.repeats, args.concurrent)
        print(f"storing {n:,} decisions for the label batches …", flush=True)
        prestore(engine, tag, n)
        runs = measure(schema, engine, tag, args)
        import sqlalchemy as sa

        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT count(*) FROM decisions")).scalar_one()
        engine.dispose()
    finally:
        drop_schema(DATABASE_URL, schema)
    text = report(runs, args, started, load_start, rows)
    print("\n" + text)
    if not args.no_write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
