"""Scale-out (issue 16): several ``metallm serve`` instances in one consumer group on one database.

(1) Decisions/s with 1, 2 and 3 instances. The arms are OpenAI-compatible endpoints that answer
    after 200 ms (``ArmServer`` in "slow" mode), ``max_in_flight`` 8 per arm per instance, so
    one instance is bound by its calls in flight, not by the 2 cores. The instances are started
    and the script waits until the group has settled (every instance's last assignment covers
    the 6 partitions, disjointly, twice in a row) before it publishes; the steady-state rate is
    taken from ``decided_at`` in Postgres between the 10th and the 90th percentile of the
    decisions (start-up, group joins and the tail are outside it). Queries per run scale with
    the number of instances (``--queries-per-instance``), so every run lasts about as long.
    Targets: ≥ 1.8× one instance's rate with 2, ≥ 2.5× with 3.
(2) Labels applied per second on one instance, Kafka → Postgres → policy at d = 384. 20,000
    decisions with 384-dim contexts are stored first (layout ``legacy``: the context is the
    384-dim vector itself, d = 384; ``default``: the default context builder on a 384-dim
    embedding, d = 450), their labels published, and one in-process
    :class:`app.application.Application` (the real LabelConsumer, Learner, LearningLog and
    LogFollower) started. Rate = rewards applied to the policy after its first label
    transaction / the time from that transaction's end to the last reward applied (the
    policy's watermark, polled every 2 ms: the first transaction's start-up is outside it).
    The first configuration is the service's defaults; the others change
    ``labels_poll_max_records`` (the most labels applied in one transaction),
    ``checkpoint_every`` and ``checkpoint_min_seconds`` (``--label-configs``), to show where
    the time goes. Target: ≥ 5,000/s.
(3) Learning lag with 3 instances, as the instances export it: each is ``metallm serve`` with
    the fault tests' embedder (``tests/faults/serve.py``), and the lag is its
    ``metallm_learning_lag_seconds`` histogram (a reward's transaction → this instance's
    policy applying it, whichever instance stored it), scraped from each instance's
    ``/metrics`` once every instance has applied every reward (its histogram's count reached
    the rewards in Postgres). Labels of pre-stored decisions are published at a steady rate
    while queries stream through; p50/p99 are interpolated within the histogram's buckets
    (as Prometheus' ``histogram_quantile``), per instance and over the three, with the mean
    (``_sum / _count``, exact).

The instances use :class:`tests.faults.harness.HashEmbedder` (16 dims), not MiniLM: this
benchmark is about the LLM-bound regime, where more instances mean more calls in flight. Three
MiniLM instances on 2 cores would measure the embedding's CPU instead (≈150-250 texts/s for the
whole machine, ``pipeline_throughput.py``), and each would take ~15 s and ~0.5 GB to load.

Every figure is a median over ``--repeats`` runs, configurations interleaved, printed with the
machine's load average (other engineers' runs share the 2 cores); targets are printed, never
asserted. The results go to ``benchmarks/results/scale_out.md`` (``--no-write``: not).

    .venv/bin/python benchmarks/scale_out.py                 # all three parts, ~15 minutes
    .venv/bin/python benchmarks/scale_out.py --parts 2 --repeats 1 --no-write
    PY_SPY=/path/to/py-spy .venv/bin/python benchmarks/scale_out.py --parts 2 --repeats 1 \
        --profile /tmp/labels.txt        # + a py-spy profile of (2)

Needs Postgres (``METALLM_TEST_DATABASE_URL``, default postgresql://postgres@127.0.0.1/test);
starts its own Tansu broker, and creates every topic itself with 6 partitions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTITIONS = 6
DATABASE_URL = os.environ.get(
    "METALLM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
ARM_DELAY_S = 0.2
IN_FLIGHT_PER_ARM = 8
ARMS = {"small": (0.1, 0.4), "large": (1.0, 4.0)}  # price in / out per 1M tokens
ACCURACY = {"small": 0.7, "large": 0.9}
RESULTS = ROOT / "benchmarks" / "results" / "scale_out.md"
log = logging.getLogger("scale_out")


# ------------------------------------------------------------------------ helpers
def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def median(values: list[float]) -> float:
    return statistics.median(values)


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (linear between order statistics)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def runs(values: list[float], fmt: str = "{:.1f}") -> str:
    return ", ".join(fmt.format(v) for v in values)


def publish_spread(bootstrap: str, topic: str, values: list[tuple[str, bytes]]) -> None:
    """Send (key, value) pairs round-robin over the partitions (an even load per instance)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for i, (key, value) in enumerate(values):
            producer.send(topic, key=key.encode(), value=value, partition=i % PARTITIONS)
        producer.flush()
    finally:
        producer.close()


@dataclass
class Stream:
    """A run's own topics, groups and schema."""

    bootstrap: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        from service.settings import isolated_stream_names

        self.names = isolated_stream_names(f"scale-{self.tag}")
        self.schema = f"scale_{self.tag}"
        self.topics = [v for k, v in self.names.items() if k.endswith("_topic")]

    def __enter__(self) -> Stream:
        from consumers.kafka_io import create_topics
        from service.migrate import upgrade

        upgrade(DATABASE_URL, self.schema)
        create_topics(self.bootstrap, self.topics, PARTITIONS)
        return self

    def __exit__(self, *exc: object) -> None:
        from consumers.kafka_io import delete_topics
        from service.migrate import drop_schema

        try:
            delete_topics(self.bootstrap, self.topics)
        except Exception:  # memory only: a topic left behind costs the broker's RAM, nothing else
            log.warning("could not delete topics %s", self.topics, exc_info=True)
        drop_schema(DATABASE_URL, self.schema)

    def engine(self):
        from service.storage import make_engine

        return make_engine(DATABASE_URL, self.schema)


def arm_server():
    from tests.faults.harness import ArmServer

    server = ArmServer({}, ACCURACY).start()
    for arm in ARMS:
        server.modes[arm] = "slow"
        server.delay[arm] = ARM_DELAY_S
    return server


def write_arm_config(server, path: Path) -> Path:
    from tests.faults.harness import arm_config, write_config

    limits = {arm: {"max_in_flight": IN_FLIGHT_PER_ARM} for arm in ARMS}
    return write_config(path, arm_config(server, ARMS, **limits))


# ------------------------------------------------------------------------ instances
class Instance:
    """One ``metallm serve`` subprocess, with the fault tests' embedder."""

    def __init__(self, name: str, env: dict[str, str], folder: Path) -> None:
        self.name = name
        self.log_path = folder / f"{name}.log"
        self.env = {**env, "METALLM_INSTANCE_ID": name}
        self.process: subprocess.Popen | None = None

    def start(self) -> Instance:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "faults" / "serve.py")],
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"instance {self.name} exited; its log ends:\n{self.log()[-3000:]}")

    def metrics_port(self) -> int | None:
        found = re.search(r"metrics on :(\d+)", self.log())
        return int(found.group(1)) if found else None

    def get(self, path: str) -> tuple[int, str]:
        port = self.metrics_port()
        if port is None:
            return 0, ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def assigned(self, consumer: str) -> frozenset[int]:
        """The partitions of this consumer's last assignment (as its log tells it)."""
        lines = re.findall(rf"{consumer}: assigned (.*)", self.log())
        if not lines:
            return frozenset()
        return frozenset(int(p) for p in re.findall(r"\[(\d+)\]", lines[-1]))

    def terminate(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9

    def lag_histogram(self) -> Histogram:
        """This instance's ``metallm_learning_lag_seconds``, scraped now."""
        return Histogram.parse(self.get("/metrics")[1], "metallm_learning_lag_seconds")


def settled(instances: list[Instance]) -> bool:
    """Every instance ready, and both groups' last assignments cover the partitions disjointly."""
    for inst in instances:
        inst.check_alive()
        if inst.get("/readyz")[0] != 200:
            return False
    for consumer in ("queries", "labels"):
        parts = [inst.assigned(consumer) for inst in instances]
        if any(not p for p in parts) or sum(len(p) for p in parts) != PARTITIONS:
            return False
        if frozenset().union(*parts) != frozenset(range(PARTITIONS)):
            return False
    return True


def start_instances(n: int, env: dict[str, str], folder: Path, timeout: float = 120) -> list:
    instances = [Instance(f"inst{i + 1}", env, folder).start() for i in range(n)]
    deadline = time.monotonic() + timeout
    stable = 0
    while time.monotonic() < deadline:
        stable = stable + 1 if settled(instances) else 0
        if stable >= 3:  # settled three checks (1 s) in a row: no rebalance under way
            return instances
        time.sleep(0.5 if stable == 0 else 0.5)
    for inst in instances:
        inst.terminate()
    raise RuntimeError(f"{n} instances did not settle within {timeout} s")


def service_env_for(stream: Stream, config: Path, **settings) -> dict[str, str]:
    from tests.faults.harness import service_env

    env = service_env(
        stream.bootstrap, stream.names, DATABASE_URL, stream.schema, config, **settings
    )
    env.pop("METALLM_POLICY_PARAMS")  # the service's defaults, not the fault tests'
    env["PYTHONPATH"] = str(ROOT)
    return env


def wait_count(engine, sql: str, n: int, timeout: float, instances: list[Instance]) -> float:
    """Poll ``sql`` (a count) until it reaches ``n``; returns the wall time it did."""
    import sqlalchemy as sa

    deadline = time.monotonic() + timeout
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watch:
        while True:
            done = watch.execute(sa.text(sql)).scalar_one()
            if done >= n:
                return time.time()
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done}/{n} after {timeout} s ({sql})")
            for inst in instances:
                inst.check_alive()
            time.sleep(0.25)


# ------------------------------------------------------------------------ (1) decisions/s
def decisions_run(bootstrap: str, server, k: int, n: int, folder: Path) -> dict:
    """Start ``k`` instances, wait until the group settled, publish ``n`` queries, and measure
    the steady-state decisions/s from ``decided_at``."""
    import sqlalchemy as sa

    from tests.faults.harness import make_queries

    with Stream(bootstrap) as stream:
        config = write_arm_config(server, folder / f"arms-{stream.tag}.yaml")
        env = service_env_for(stream, config)
        queries = make_queries(n, prefix=f"q-{stream.tag}")
        server.truth.clear()
        server.truth.update({q.query_id: q for q in queries})
        run_dir = folder / stream.tag
        run_dir.mkdir()
        started = time.monotonic()
        instances = start_instances(k, env, run_dir)
        settle_s = time.monotonic() - started
        engine = stream.engine()
        try:
            published = time.time()
            publish_spread(
                bootstrap, stream.names["queries_topic"], [(q.query_id, q.event()) for q in queries]
            )
            wait_count(engine, "SELECT count(*) FROM decisions", n, 600, instances)
            with engine.connect() as conn:
                times = [
                    t.timestamp()
                    for (t,) in conn.execute(
                        sa.text("SELECT decided_at FROM decisions ORDER BY decided_at")
                    )
                ]
                per_instance = {
                    a: b
                    for a, b in conn.execute(
                        sa.text("SELECT instance, count(*) FROM decisions GROUP BY 1")
                    )
                }
                per_arm = {
                    a: b
                    for a, b in conn.execute(
                        sa.text("SELECT arm, count(*) FROM decisions GROUP BY 1")
                    )
                }
                statuses = {
                    a: b
                    for a, b in conn.execute(
                        sa.text("SELECT status, count(*) FROM decisions GROUP BY 1")
                    )
                }
        finally:
            codes = [inst.terminate() for inst in instances]
            engine.dispose()
    lo, hi = int(0.1 * (n - 1)), int(0.9 * (n - 1))
    return {
        "instances": k,
        "queries": n,
        "rate": (hi - lo) / (times[hi] - times[lo]),
        "end_to_end": n / (times[-1] - published),
        "settle_s": settle_s,
        "per_instance": per_instance,
        "per_arm": per_arm,
        "statuses": statuses,
        "exit_codes": codes,
        "load": load(),
    }


def part_decisions(bootstrap: str, folder: Path, counts: list[int], repeats: int, per: int) -> dict:
    server = arm_server()
    results: dict[int, list[dict]] = {k: [] for k in counts}
    try:
        for repeat in range(repeats):
            order = counts if repeat % 2 == 0 else list(reversed(counts))
            for k in order:
                r = decisions_run(bootstrap, server, k, per * k, folder)
                results[k].append(r)
                print(
                    f"  run {repeat + 1}, {k} instance(s): {r['rate']:.1f} decisions/s steady "
                    f"({r['end_to_end']:.1f} end to end, settled in {r['settle_s']:.1f} s); "
                    f"per instance {sorted(r['per_instance'].values())}, arms {r['per_arm']}, "
                    f"statuses {r['statuses']}, exits {r['exit_codes']}; load {r['load']}",
                    flush=True,
                )
    finally:
        server.stop()
    return results


# ------------------------------------------------------------------------ (2) labels/s
def stored_decision_rows(
    tag: str, n: int, dim: int, layout: str, builder=None, seed: int = 0
) -> tuple[list[dict], list[tuple[str, bytes]]]:
    """``n`` decision rows with ``dim``-dim unit contexts (random, seeded) and their labels."""
    import numpy as np

    from service import storage
    from tests.faults.harness import make_queries

    rng = np.random.default_rng(seed)
    queries = make_queries(n, prefix=f"q-{tag}", seed=seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    arms = list(ARMS)
    rows, labels = [], []
    for i, q in enumerate(queries):
        if builder is None:
            context, spec = vectors[i], None
        else:
            context = builder.build(q.task, q.text, None, vectors[i])
            builder.observe(q.task, len(q.text), None)
            spec = builder.spec
        arm = arms[i % len(arms)]
        right = rng.random() < ACCURACY[arm]
        rows.append(
            {
                "query_id": q.query_id,
                "task": q.task,
                "text": q.text,
                "options": ["positive", "negative"] if q.task == "sentiment" else ["yes", "no"],
                "metadata": None,
                "arm": arm,
                "propensity": 0.5,
                "probabilities": {a: 0.5 for a in arms},
                "policy": "linucb",
                "status": "ok",
                "prediction": q.label if right else q.wrong,
                "input_tokens": 50,
                "output_tokens": 1,
                "cost_usd": 50 * ARMS[arm][0] / 1e6 + ARMS[arm][1] / 1e6,
                "latency_ms": 200.0,
                "embedding_model": f"bench-{dim}",
                "context": storage.vector_to_bytes(context),
                "context_layout": spec,
                "instance": "bench-prestored",
            }
        )
        labels.append((q.query_id, q.label_event()))
    return rows, labels


def prestore(engine, rows: list[dict], chunk: int = 2000) -> None:
    from service.log.decisions import insert_decisions

    for i in range(0, len(rows), chunk):
        with engine.begin() as conn:
            insert_decisions(conn, rows[i : i + chunk])


class WatermarkWatch:
    """Polls a :class:`LivePolicy`'s reward watermark every 2 ms from a thread of its own: when
    it first moves (the first label transaction is applied) and when it reaches ``n``."""

    def __init__(self, live, n: int) -> None:
        self.live, self.n = live, n
        self.done = threading.Event()
        self._stopped = threading.Event()
        self.first_at = self.last_at = 0.0
        self.first_seq = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="watermark-watch")

    def start(self) -> WatermarkWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.wait(0.002):
            seq = self.live.watermark
            if seq and not self.first_seq:
                self.first_at, self.first_seq = time.perf_counter(), seq
            if seq >= self.n:
                self.last_at = time.perf_counter()
                self.done.set()
                return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def last_checkpoint_id(engine) -> int:
    """The newest policy checkpoint's id (ids grow with each one stored; 0: none yet)."""
    import sqlalchemy as sa

    with engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT coalesce(max(id), 0) FROM policy_checkpoints")
        ).scalar_one()


def labels_run(
    bootstrap: str,
    n: int,
    layout: str,
    poll_max: int,
    every: int,
    min_seconds: float,
    profile: Path | None,
) -> dict:
    """One in-process Application applying ``n`` labels of pre-stored decisions."""
    import sqlalchemy as sa

    from service.config import parse_config
    from service.settings import Settings
    from tests.faults.harness import TASKS, HashEmbedder

    with Stream(bootstrap) as stream:
        settings = Settings(
            kafka_bootstrap=bootstrap,
            database_url=DATABASE_URL,
            database_schema=stream.schema,
            **stream.names,
            session_timeout_ms=1500,
            heartbeat_interval_ms=400,
            metrics_port=None,
            context_embedding="legacy" if layout == "legacy" else "raw",
            labels_poll_max_records=poll_max,
            checkpoint_every=every,
            checkpoint_min_seconds=min_seconds,
            instance_id="labels-bench",
        )
        config_doc = {
            "tasks": TASKS,
            "arms": [
                {"name": a, "provider": "openai", "model": a, "base_url": "http://127.0.0.1:9/v1"}
                for a in ARMS
            ],
        }
        config = parse_config(config_doc)
        builder = (
            None if layout == "legacy" else settings.context_builder(config.declared_features())
        )
        rows, labels = stored_decision_rows(stream.tag, n, 384, layout, builder)
        d = len(rows[0]["context"]) // 4
        engine = stream.engine()
        prestore(engine, rows)
        publish_spread(bootstrap, stream.names["labels_topic"], labels)

        from app.application import Application

        service = Application.build(settings, config=config, embedder=HashEmbedder(384))
        checkpoints_before = last_checkpoint_id(engine)
        watch = WatermarkWatch(service.live, n).start()
        spy = None
        if profile is not None:  # every thread of this process, sampled from outside
            spy = subprocess.Popen(
                [
                    os.environ.get("PY_SPY", "py-spy"),
                    "record",
                    "--pid",
                    str(os.getpid()),
                    "--threads",
                    *(["--idle"] if os.environ.get("PY_SPY_IDLE") else []),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    str(
                        profile.with_name(
                            f"{profile.stem}-{layout}-{poll_max}-{every}-{min_seconds:g}{profile.suffix}"
                        )
                    ),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # attached before the labels flow
        service.start()
        try:
            if not watch.done.wait(600):
                raise RuntimeError(f"only {service.live.watermark}/{n} labels applied after 600 s")
            taken = last_checkpoint_id(engine) - checkpoints_before  # before the stop's own
        finally:
            watch.stop()
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                spy.wait(60)
            service.stop()
        with engine.connect() as conn:
            rewarded = conn.execute(
                sa.text("SELECT count(*) FROM decisions WHERE reward_seq IS NOT NULL")
            ).scalar_one()
            batches = conn.execute(
                sa.text("SELECT count(DISTINCT reward_applied_at) FROM decisions")
            ).scalar_one()
        engine.dispose()
    return {
        "layout": layout,
        "d": d,
        "labels": n,
        "rewarded": rewarded,
        "transactions": batches,
        "rate": (n - watch.first_seq) / (watch.last_at - watch.first_at),
        "seconds": watch.last_at - watch.first_at,
        "poll_max": poll_max,
        "checkpoint_every": every,
        "checkpoint_min_seconds": min_seconds,
        "checkpoints": taken,
        "load": load(),
    }


DEFAULT_LABEL_CONFIGS = (
    "legacy:1000:100:5,default:1000:100:5,legacy:64:100:5,legacy:5000:100:5,"
    "legacy:1000:100:0,legacy:64:100:0,legacy:1000:off:5"
)
NO_CHECKPOINTS = 10**9  # "off": only the one at stop, after the measured window


def label_configs(spec: str) -> list[tuple[str, int, int, float]]:
    """``LAYOUT:POLL:CHECKPOINT_EVERY[:MIN_SECONDS],…`` (``off``: no checkpoint in the window;
    MIN_SECONDS: ``checkpoint_min_seconds``, default 5 as the service's)."""
    out = []
    for item in spec.split(","):
        layout, poll, every, *rest = item.split(":")
        every_n = NO_CHECKPOINTS if every == "off" else int(every)
        out.append((layout, int(poll), every_n, float(rest[0]) if rest else 5.0))
    return out


def every_label(every: int) -> str:
    return "off" if every >= NO_CHECKPOINTS else str(every)


def part_labels(
    bootstrap: str,
    n: int,
    configs: list[tuple[str, int, int, float]],
    repeats: int,
    profile: Path | None,
) -> dict:
    results: dict[tuple[str, int, int, float], list[dict]] = {c: [] for c in configs}
    for repeat in range(repeats):
        for key in results if repeat % 2 == 0 else list(reversed(list(results))):
            r = labels_run(bootstrap, n, *key, profile)
            results[key].append(r)
            print(
                f"  run {repeat + 1}, layout {r['layout']} (d = {r['d']}), poll {r['poll_max']}, "
                f"checkpoint every {every_label(r['checkpoint_every'])} rewards, "
                f"at most every {r['checkpoint_min_seconds']:g} s "
                f"({r['checkpoints']} taken in the window): "
                f"{r['rate']:,.0f} labels/s ({r['labels']} in {r['seconds']:.2f} s, "
                f"{r['transactions']} transactions, {r['rewarded']} rewards stored); "
                f"load {r['load']}",
                flush=True,
            )
    return results


# ------------------------------------------------------------------------ (3) learning lag
@dataclass(frozen=True)
class Histogram:
    """One Prometheus histogram of a scrape: cumulative counts by upper bound, count and sum."""

    buckets: dict[float, float]
    count: float
    total: float

    @classmethod
    def parse(cls, text: str, name: str) -> Histogram:
        """``name``'s series in a ``/metrics`` text (no labels); empty if it is not there."""
        buckets = {
            float("inf") if le == "+Inf" else float(le): float(value)
            for le, value in re.findall(
                rf'^{name}_bucket\{{le="([^"]+)"\}} ([0-9.e+-]+)$', text, re.M
            )
        }
        count = re.search(rf"^{name}_count ([0-9.e+-]+)$", text, re.M)
        total = re.search(rf"^{name}_sum ([0-9.e+-]+)$", text, re.M)
        return cls(
            buckets,
            float(count.group(1)) if count else 0.0,
            float(total.group(1)) if total else 0.0,
        )

    def __add__(self, other: Histogram) -> Histogram:
        edges = set(self.buckets) | set(other.buckets)
        return Histogram(
            {le: self.buckets.get(le, 0.0) + other.buckets.get(le, 0.0) for le in edges},
            self.count + other.count,
            self.total + other.total,
        )

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def quantile(self, q: float) -> float:
        """Prometheus' ``histogram_quantile``: linear within the bucket the rank falls in."""
        if not self.count:
            return float("nan")
        rank = q * self.count
        prev_le, prev_count = 0.0, 0.0
        for le in sorted(self.buckets):
            count = self.buckets[le]
            if count >= rank:
                if le == float("inf"):
                    return prev_le
                if count == prev_count:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
            prev_le, prev_count = le, count
        return float("nan")


def lag_run(
    bootstrap: str, folder: Path, k: int, labels_n: int, label_rate: float, queries_n: int
) -> dict:
    """``k`` instances; labels of pre-stored decisions published at ``label_rate``/s while
    ``queries_n`` queries stream through; each instance's learning-lag histogram once every
    instance has applied every reward."""
    import sqlalchemy as sa
    from kafka import KafkaProducer

    from service.config import parse_config
    from service.settings import Settings
    from tests.faults.harness import HashEmbedder, make_queries

    server = arm_server()
    try:
        with Stream(bootstrap) as stream:
            config_path = write_arm_config(server, folder / f"arms-{stream.tag}.yaml")
            env = service_env_for(stream, config_path)
            # decisions stored before the instances start, in the layout they are configured
            # with (the default builder on HashEmbedder's 16 dims), for the labels to reward
            import yaml

            config = parse_config(yaml.safe_load(config_path.read_text()))
            builder = Settings(_env_file=None).context_builder(config.declared_features())
            rows, labels = stored_decision_rows(
                stream.tag, labels_n, HashEmbedder().dim, "default", builder
            )
            engine = stream.engine()
            prestore(engine, rows)
            queries = make_queries(queries_n, prefix=f"q-{stream.tag}x")
            server.truth.clear()
            server.truth.update({q.query_id: q for q in queries})
            run_dir = folder / stream.tag
            run_dir.mkdir()
            instances = start_instances(k, env, run_dir)
            try:
                publish_spread(
                    bootstrap,
                    stream.names["queries_topic"],
                    [(q.query_id, q.event()) for q in queries],
                )
                producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
                t0 = time.monotonic()
                for i, (key, value) in enumerate(labels):
                    wait = t0 + i / label_rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    producer.send(
                        stream.names["labels_topic"],
                        key=key.encode(),
                        value=value,
                        partition=i % PARTITIONS,
                    )
                producer.flush()
                producer.close()
                publish_s = time.monotonic() - t0
                rewarded = "SELECT count(*) FROM decisions WHERE reward_seq IS NOT NULL"
                wait_count(engine, rewarded, labels_n, 300, instances)
                wait_count(
                    engine, "SELECT count(*) FROM decisions", labels_n + queries_n, 300, instances
                )
                with engine.connect() as conn:  # with any failure rewards of the queries
                    rewards = int(conn.execute(sa.text(rewarded)).scalar_one())
                # every instance applies every reward (the followers poll at least every second)
                deadline = time.monotonic() + 60
                while True:
                    histograms = [inst.lag_histogram() for inst in instances]
                    if all(h.count >= rewards for h in histograms) or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
            finally:
                codes = [inst.terminate() for inst in instances]
                engine.dispose()
    finally:
        server.stop()
    return {
        "instances": k,
        "rewards": rewards,
        "histograms": {inst.name: h for inst, h in zip(instances, histograms, strict=True)},
        "label_rate": label_rate,
        "publish_s": publish_s,
        "exit_codes": codes,
        "load": load(),
    }


def summed(histograms: dict[str, Histogram]) -> Histogram:
    first, *rest = histograms.values()
    for h in rest:
        first = first + h
    return first


def part_lag(
    bootstrap: str, folder: Path, repeats: int, labels_n: int, rate: float, queries_n: int
) -> list:
    out = []
    for repeat in range(repeats):
        r = lag_run(bootstrap, folder, 3, labels_n, rate, queries_n)
        out.append(r)
        every = summed(r["histograms"])
        counts = {name: int(h.count) for name, h in r["histograms"].items()}
        print(
            f"  run {repeat + 1}: {r['rewards']} rewards, applied per instance {counts}; lag "
            f"over the 3: p50 {1000 * every.quantile(0.5):.1f} ms, p99 "
            f"{1000 * every.quantile(0.99):.1f} ms, mean {1000 * every.mean:.1f} ms; exits "
            f"{r['exit_codes']}; load {r['load']}",
            flush=True,
        )
    return out


# ------------------------------------------------------------------------ report
def report(
    decisions: dict | None, labels: dict | None, lag: list | None, args, started: str
) -> str:
    import platform

    lines = [
        "# Scale-out (issue 16): `benchmarks/scale_out.py`",
        "",
        f"Run of {started} at commit {commit()}, {os.cpu_count()} cores ({cpu_model()}), "
        f"Python {platform.python_version()}; load average at the start {args.load_start}, "
        f"at the end {load()}. Medians of {args.repeats} runs per configuration, "
        "configurations interleaved. Arms: OpenAI-compatible endpoints answering after "
        f"{int(ARM_DELAY_S * 1000)} ms, `max_in_flight` {IN_FLIGHT_PER_ARM} per arm per "
        "instance, 2 arms; embedder: HashEmbedder (16 dims; the LLM-bound regime); topics of "
        f"{PARTITIONS} partitions.",
        "",
    ]
    if decisions:
        base = median([r["rate"] for r in decisions[min(decisions)]])
        lines += [
            "## (1) Decisions/s by number of instances",
            "",
            "Steady state: decisions between the 10th and 90th percentile of `decided_at`, "
            f"{args.queries_per_instance} queries per instance, published once the group has "
            "settled.",
            "",
            "| instances | queries | decisions/s (median) | runs | × 1 instance | target |",
            "|---|---|---|---|---|---|",
        ]
        targets = {2: 1.8, 3: 2.5}
        for k, rs in decisions.items():
            rate = median([r["rate"] for r in rs])
            t = targets.get(k)
            verdict = "" if t is None else f"≥ {t}× — {'met' if rate / base >= t else 'NOT met'}"
            lines.append(
                f"| {k} | {rs[0]['queries']} | {rate:.1f} | {runs([r['rate'] for r in rs])} | "
                f"{rate / base:.2f}× | {verdict} |"
            )
        lines += [
            "",
            f"One instance can have {2 * IN_FLIGHT_PER_ARM} calls in flight (2 arms × "
            f"{IN_FLIGHT_PER_ARM}), so at most {2 * IN_FLIGHT_PER_ARM / ARM_DELAY_S:.0f} "
            "decisions/s; each instance added brings its own calls in flight.",
            "",
            "Per run: decisions per instance, per arm, and end to end (first publish → last "
            "decision) rate:",
            "",
        ]
        for k, rs in decisions.items():
            for r in rs:
                lines.append(
                    f"- {k}: per instance {sorted(r['per_instance'].values())}, arms "
                    f"{r['per_arm']}, end to end {r['end_to_end']:.1f}/s, statuses "
                    f"{r['statuses']}, exit codes {r['exit_codes']}, load {r['load']}"
                )
        lines.append("")
    if labels:
        lines += [
            "## (2) Labels applied per second, one instance",
            "",
            f"{args.labels:,} pre-stored decisions, their labels published first; one in-process "
            "Application; rewards applied after the first label transaction / its end → the last "
            "reward applied to the policy (the policy's watermark, polled every 2 ms).",
            "",
            "The first row is the service's defaults (`METALLM_LABELS_POLL_MAX_RECORDS` 1000, "
            "`METALLM_CHECKPOINT_EVERY` 100, `METALLM_CHECKPOINT_MIN_SECONDS` 5, checkpoints "
            "stored by the `Checkpointer` thread); the others change settings to show where the "
            "time goes (`off`: no checkpoint inside the measured window; checkpoints: how many "
            "were taken in the window, median).",
            "",
            "| layout | d | labels_poll_max_records | checkpoint_every | checkpoint_min_seconds "
            "| checkpoints | labels/s (median) | runs | target ≥ 5,000/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for (layout, poll, every, min_s), rs in labels.items():
            rate = median([r["rate"] for r in rs])
            taken = median([r["checkpoints"] for r in rs])
            lines.append(
                f"| {layout} | {rs[0]['d']} | {poll} | {every_label(every)} | {min_s:g} | "
                f"{taken:g} | {rate:,.0f} | "
                f"{runs([r['rate'] for r in rs], '{:,.0f}')} | "
                f"{'met' if rate >= 5000 else 'NOT met'} |"
            )
        lines.append("")
    if lag:
        lines += [
            "## (3) Learning lag, 3 instances",
            "",
            f"{args.lag_labels:,} labels published at {args.lag_rate:.0f}/s while "
            f"{args.lag_queries:,} queries stream through. Lag of a reward on an instance: "
            "`metallm_learning_lag_seconds`, scraped from each instance once every instance "
            "had applied every reward.",
            "",
            "| instance | p50 (median of runs) | p99 (median of runs) | mean | runs p50 / p99 |",
            "|---|---|---|---|---|",
        ]
        rows = {name: [r["histograms"][name] for r in lag] for name in lag[0]["histograms"]}
        rows["the 3 together"] = [summed(r["histograms"]) for r in lag]
        for name, hs in rows.items():
            p50s = [1000 * h.quantile(0.5) for h in hs]
            p99s = [1000 * h.quantile(0.99) for h in hs]
            means = [1000 * h.mean for h in hs]
            lines.append(
                f"| {name} | {median(p50s):.1f} ms | {median(p99s):.1f} ms | "
                f"{median(means):.1f} ms | {runs(p50s)} / {runs(p99s)} ms |"
            )
        lines += [
            "",
            "The histogram counts from the reward transaction's start (`reward_applied_at` is "
            "`now()`; the owner's own rewards from `Learner.learn`'s start), so it includes "
            "the transaction itself, waiting for the learning log's lock among them; it mixes "
            "an instance's own rewards with those it follows from the others, and its "
            "quantiles are interpolated within its buckets (the mean is exact).",
            "",
        ]
    return "\n".join(lines)


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (1,2,3)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instances", default="1,2,3")
    parser.add_argument("--queries-per-instance", type=int, default=1600)
    parser.add_argument("--labels", type=int, default=20_000)
    parser.add_argument(
        "--label-configs",
        default=DEFAULT_LABEL_CONFIGS,
        help="(2): LAYOUT:LABELS_POLL_MAX_RECORDS:CHECKPOINT_EVERY[:MIN_SECONDS],… (layout "
        "legacy: d = 384, default: the default builder on 384 dims, d = 450; checkpoint off: "
        "none in the window; MIN_SECONDS default 5)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="(2): py-spy (raw, by thread) of each run's measured window, named after this path",
    )
    parser.add_argument("--lag-labels", type=int, default=6000)
    parser.add_argument("--lag-rate", type=float, default=200.0)
    parser.add_argument("--lag-queries", type=int, default=4800)
    parser.add_argument("--no-write", action="store_true", help="do not write results/scale_out.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    parts = {int(p) for p in args.parts.split(",")}
    args.load_start = load()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"cores: {os.cpu_count()}; repeats: {args.repeats}; load: {args.load_start}", flush=True)
    from producers.local_broker import LocalBroker

    decisions = labels = lag = None
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
        folder = Path(tmp)
        if 1 in parts:
            print("\n(1) decisions/s by instances", flush=True)
            counts = [int(k) for k in args.instances.split(",")]
            decisions = part_decisions(
                broker.bootstrap, folder, counts, args.repeats, args.queries_per_instance
            )
        if 2 in parts:
            print("\n(2) labels applied per second, one instance", flush=True)
            labels = part_labels(
                broker.bootstrap,
                args.labels,
                label_configs(args.label_configs),
                args.repeats,
                args.profile,
            )
        if 3 in parts:
            print("\n(3) learning lag, 3 instances", flush=True)
            lag = part_lag(
                broker.bootstrap,
                folder,
                args.repeats,
                args.lag_labels,
                args.lag_rate,
                args.lag_queries,
            )
    text = report(decisions, labels, lag, args, started)
    print("\n" + text)
    if not args.no_write:
        RESULTS.write_text(text + "\n")
        print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
