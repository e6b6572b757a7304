"""The mixed-fault soak's scenario (issue 25, item 5): two ``metallm serve`` instances under a
steady load of queries and labels while a seeded schedule of faults hits them one at a time;
:func:`run` returns the figures and :func:`broken` the invariants they break;
``benchmarks/soak.py`` runs it (20 minutes by default) and reports them;
``tests/faults/test_soak.py`` runs a short one (five kinds of fault, once each) for the invariants.

The faults, in a seeded order, each lasting a seeded 10–60 s (``fault_seconds``):

- ``broker_pause``: the broker (Tansu) frozen with SIGSTOP, then SIGCONT;
- ``broker_cut``: the TCP proxy every Kafka client goes through (the broker advertises it)
  cuts every connection and refuses new ones, then lets them through again;
- ``pg_restart``: the soak's private Postgres (never the machine's own on 5432) stopped
  ``immediate`` (a crash), then started again;
- ``pg_cut``: the TCP proxy in front of that Postgres cuts and refuses connections;
- ``kill``: kill -9 of the second instance, restarted at once (a warm standby process: the
  first instance runs the whole soak, so its memory is measured from minute 5 to the end);
- ``arm_5xx`` and ``arm_timeout``: the arms answer HTTP 500, or too late (past their 2 s
  timeout), for 10–30 s.

And throughout, 5 % malformed events beside the real ones on both input topics (not JSON,
fields missing, an unknown task), which must all reach the dead-letter topic. A local broker
restart is not among the faults: Tansu keeps its topics in memory, so a restart loses them and
``serve`` stops with exit code 4 by design (``tests/faults/test_health.py``).

Each instance's ``/readyz`` is probed every second and compared with the truth: not ready while
a dependency is down (broker paused or cut, Postgres down or cut) or before the instance
serves, ready otherwise — probes in the 5 s after any change of state are not counted. The
figures come from Postgres, the arm server's call log (every LLM call, by the process that
made it: :func:`tests.faults.scale_scenario._count`), the topics, and the instances' policy
dumps (written on their SIGTERM at the end).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from kafka import KafkaProducer

from consumers.kafka_io import create_topics
from producers.local_broker import LocalBroker, free_port, tansu_binary
from service.migrate import upgrade
from service.settings import isolated_stream_names
from service.storage import make_engine
from tests.faults.harness import (
    POLICY_DUMP,
    ArmServer,
    PrivatePostgres,
    ServiceProcess,
    arm_config,
    make_queries,
    read_all,
    service_env,
    write_config,
)
from tests.faults.kill_scenario import ACCURACY, PRICES
from tests.faults.scale_scenario import (
    PARTITIONS,
    Fleet,
    ScaleFigures,
    _count,
    committed_total,
    event_keys,
)

DEPENDENCY_FAULTS = ("broker_pause", "broker_cut", "pg_restart", "pg_cut")
FAULTS = (*DEPENDENCY_FAULTS, "kill", "arm_5xx", "arm_timeout")
ARM_LIMITS = {"timeout_seconds": 2.0, "max_retries": 0, "breaker_cooldown_seconds": 2.0}
SETTLE_S = 5.0  # probes this long after a change of state are not counted
LABEL_DELAY_S = 2.0
MALFORMED_SHARE = 0.05
SCHEMA = "soak"


# --------------------------------------------------------------------------- the links
class TcpProxy:
    """A TCP proxy on a port of its own: :meth:`cut` closes every connection and refuses new
    ones (accepted and closed at once) until :meth:`restore`."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target = ("127.0.0.1", target_port)
        self.up = True
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", port or 0), reuse_port=False)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self.up = False
            doomed, self._sockets = self._sockets, set()
        for s in doomed:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.up = True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._sockets -= {source, sink}


class ProxiedBroker(LocalBroker):
    """Tansu listening on a port of its own and advertising the proxy's: every Kafka client,
    the service's and the soak's, goes through :attr:`proxy` once it has read the metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.proxy = TcpProxy(self.port, free_port())
        self.bootstrap = f"127.0.0.1:{self.proxy.port}"

    def _spawn(self, url: str, log) -> None:
        self.process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",  # ``url`` is the advertised one: the proxy's
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


# --------------------------------------------------------------------------- the fleet
class SoakFleet(Fleet):
    """The scale scenario's fleet, each process with a metrics port of its own (to probe)
    and arms that give up after 2 s."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.started_at: dict[str, float] = {}
        self.serving_at: dict[str, float] = {}

    def spawn(self) -> None:
        name = f"i{self.spawned:02d}"
        self.spawned += 1
        arms = arm_config(self.server, PRICES, caller=name, **dict.fromkeys(PRICES, ARM_LIMITS))
        config = write_config(self.workdir / f"metallm-{name}.yaml", arms)
        port = free_port()
        env = {
            **self.base_env,
            "METALLM_INSTANCE_ID": name,
            "METALLM_CONFIG": str(config),
            "METALLM_METRICS_PORT": str(port),
            POLICY_DUMP: str(self.dump_path(name)),
        }
        process = ServiceProcess(env, self.workdir / f"service-{name}.log", standby=True)
        self.spares.append((name, process.start()))
        self.ports[name] = port

    def start(self) -> str:
        name = super().start()
        self.pids[name] = self.live[name].process.pid
        self.started_at[name] = time.time()
        return name

    def note_serving(self) -> None:
        for name, process in list(self.live.items()):
            if name not in self.serving_at and process.serving:
                self.serving_at[name] = time.time()


# --------------------------------------------------------------------------- the load
class LoadGenerator:
    """Publishes the queries of ``pool`` at ``rate`` a second, each one's label
    :data:`LABEL_DELAY_S` later, and beside them :data:`MALFORMED_SHARE` malformed events on
    each topic; records what the broker took (a send that failed is counted, not retried)."""

    def __init__(self, bootstrap: str, topics: dict[str, str], pool: list, rate: float, seed: int):
        self.topics = topics
        self.pool = pool
        self.rate = rate
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.queries: dict[str, float] = {}  # query id → time.time() it was sent
        self.labels = 0
        self.malformed: set[tuple[str, int, int]] = set()  # topic, partition, offset
        self.failed_sends = 0
        self._lock = threading.Lock()
        self._waiting: list[tuple[float, object]] = []  # (due, query): labels to send
        self._bad = itertools.count()
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=5,
            delivery_timeout_ms=900_000,  # outlives any outage: nothing given up
            max_block_ms=900_000,
            reconnect_backoff_max_ms=1000,
        )
        self.thread = threading.Thread(target=self._run, name="soak-load", daemon=True)

    def _send(self, topic: str, key: str, value: bytes, kind: str) -> None:
        at = time.time()

        def ok(meta) -> None:
            with self._lock:
                if kind == "query":
                    self.queries[key] = at
                elif kind == "label":
                    self.labels += 1
                else:
                    self.malformed.add((meta.topic, meta.partition, meta.offset))

        def failed(_exc) -> None:
            with self._lock:
                self.failed_sends += 1

        future = self.producer.send(topic, key=key.encode(), value=value)
        future.add_callback(ok).add_errback(failed)

    def _maybe_malformed(self, topic: str, i: int) -> None:
        if self.rng.random() >= MALFORMED_SHARE:
            return
        key = f"bad-{topic.rsplit('.', 1)[-1]}-{i}"
        body = self.rng.choice(
            [
                b"{not json",
                json.dumps({"query_id": key}).encode(),
                json.dumps({"query_id": key, "text": "x", "task": "no_such_task"}).encode(),
            ]
        )
        self._send(topic, key, body, "malformed")

    def _labels_due(self, until: float) -> None:
        while self._waiting and self._waiting[0][0] <= until:
            _, q = self._waiting.pop(0)
            self._send(self.topics["labels_topic"], q.query_id, q.label_event(), "label")
            self._maybe_malformed(self.topics["labels_topic"], next(self._bad))

    def _run(self) -> None:
        started = time.monotonic()
        for i, q in enumerate(self.pool):
            due = started + i / self.rate
            while not self.stop.is_set() and time.monotonic() < due:
                time.sleep(min(0.05, max(0.0, due - time.monotonic())))
            if self.stop.is_set():
                break
            self._send(self.topics["queries_topic"], q.query_id, q.event(), "query")
            self._waiting.append((time.monotonic() + LABEL_DELAY_S, q))
            self._maybe_malformed(self.topics["queries_topic"], i)
            self._labels_due(time.monotonic())
        time.sleep(LABEL_DELAY_S)
        self._labels_due(float("inf"))  # the last queries' labels
        self.producer.flush()

    def start(self) -> LoadGenerator:
        self.thread.start()
        return self

    def finish(self, timeout: float = 120.0) -> None:
        self.stop.set()
        self.thread.join(timeout)
        self.producer.close(timeout=30)


# --------------------------------------------------------------------------- the probes
@dataclass
class Probe:
    at: float  # time.time()
    instance: str
    ready: bool


class Watch:
    """Every second: each live instance's ``/readyz`` and resident memory; and when each
    started serving. Dependency outages are noted by the schedule (:meth:`outage`)."""

    def __init__(self, fleet: SoakFleet) -> None:
        self.fleet = fleet
        self.probes: list[Probe] = []
        self.rss: dict[str, list[tuple[float, int]]] = {}  # instance → (time, kB)
        self.outages: list[tuple[float, float]] = []  # a dependency down: (from, to)
        self.changes: list[float] = []  # every change of state: fault start and end, kills
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-watch", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.fleet.note_serving()
            for name, process in list(self.fleet.live.items()):
                if not process.alive:
                    continue
                self.probes.append(Probe(time.time(), name, _ready(self.fleet.ports[name])))
                kb = _rss_kb(process.process.pid)
                if kb:
                    self.rss.setdefault(name, []).append((time.time(), kb))

    def truth(self, probe: Probe) -> bool | None:
        """Whether the instance should have been ready (None: too near a change of state)."""
        t = probe.at
        serving = self.fleet.serving_at.get(probe.instance)
        moments = [*self.changes, self.fleet.started_at.get(probe.instance, 0.0)]
        if serving is not None:
            moments.append(serving)
        if any(m <= t < m + SETTLE_S for m in moments):
            return None
        if serving is None or t < serving:
            return False
        return not any(a <= t < b for a, b in self.outages)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2.0) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- the faults
@dataclass
class Fault:
    kind: str
    began: float = 0.0  # time.time()
    returned: float = 0.0  # the dependency back (the instance restarted, the arm well)
    first_decision_s: float | None = None  # from the return to the next decision stored
    backlog_s: float | None = None  # from the return until every query sent before it decided


class Faults:
    """Inflicts the faults, one at a time, on the broker, Postgres, the fleet and the arms."""

    def __init__(self, broker, pg, pg_proxy, fleet, server, watch, rng) -> None:
        self.broker, self.pg, self.pg_proxy = broker, pg, pg_proxy
        self.fleet, self.server, self.watch, self.rng = fleet, server, watch, rng

    def inflict(self, fault: Fault, seconds: float, say) -> None:
        fault.began = time.time()
        self.watch.changes.append(fault.began)
        say(f"{fault.kind} for {seconds:.0f} s")
        if fault.kind == "kill":
            victim = sorted(self.fleet.live)[-1]  # the second instance: the first runs through
            self.fleet.kill(victim)
            started = self.fleet.start()
            say(f"  killed {victim}, started {started}")
        elif fault.kind in ("arm_5xx", "arm_timeout"):
            for arm in PRICES:
                self.server.modes[arm] = "error" if fault.kind == "arm_5xx" else "slow"
                self.server.delay[arm] = ARM_LIMITS["timeout_seconds"] + 0.5
            time.sleep(seconds)
            for arm in PRICES:
                self.server.modes[arm] = "ok"
        else:
            down, up = self._dependency(fault.kind)
            down()
            try:
                time.sleep(seconds)
            finally:
                up()
            self.watch.outages.append((fault.began, time.time()))
        fault.returned = time.time()
        self.watch.changes.append(fault.returned)

    def _dependency(self, kind: str):
        pid = self.broker.process.pid
        return {
            "broker_pause": (
                lambda: os.kill(pid, signal.SIGSTOP),
                lambda: os.kill(pid, signal.SIGCONT),
            ),
            "broker_cut": (self.broker.proxy.cut, self.broker.proxy.restore),
            "pg_restart": (lambda: self.pg.stop("immediate"), self.pg.start),
            "pg_cut": (self.pg_proxy.cut, self.pg_proxy.restore),
        }[kind]


def fault_seconds(kind: str, rng: random.Random, lo: float, hi: float) -> float:
    if kind == "kill":
        return 0.0
    if kind.startswith("arm_"):
        return rng.uniform(lo, (lo + hi) / 2)
    return rng.uniform(lo, hi)


# --------------------------------------------------------------------------- the run
@dataclass
class SoakFigures(ScaleFigures):
    minutes: float = 0.0
    rate: float = 0.0
    failed_sends: int = 0  # the load's sends the broker never took (a harness failure)
    malformed_published: int = 0
    malformed_missing_from_dlq: int = 0
    arm_failures: int = 0  # decisions whose chosen arm failed (service.decision.arm_failed)
    unexpected_exits: list[str] = field(default_factory=list)
    final_ready: list[str] = field(default_factory=list)  # instances ready before the SIGTERM
    probes: int = 0
    probes_counted: int = 0
    probes_truthful: int = 0
    probes_wrong: list[str] = field(default_factory=list)  # a few, for the report
    faults: list[Fault] = field(default_factory=list)
    rss: dict[str, tuple[float, int, int]] = field(default_factory=dict)  # from min, kB, kB
    #: those instances' resident memory at each minute of the run (kB)
    rss_by_minute: dict[str, list[int]] = field(default_factory=dict)


def decided_count(engine: sa.Engine) -> int | None:
    """Decisions stored so far (None: Postgres does not answer now)."""
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM decisions")).scalar_one())
    except sa.exc.DBAPIError:
        return None


def wait_for(condition, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


@dataclass(frozen=True)
class SoakPlan:
    """How long, how much load, which faults and how long each lasts."""

    minutes: float = 20.0
    rate: float = 10.0  # queries per second
    seed: int = 25
    fault_seconds: tuple[float, float] = (10.0, 60.0)  # a dependency fault's length, drawn
    warmup: float = 60.0  # seconds before the first fault
    gap: float = 20.0  # seconds between a fault's recovery and the next
    tail: float = 50.0  # seconds of load at least after the last fault's return
    faults: tuple[str, ...] = FAULTS
    #: 0: faults one after another while they fit in ``minutes``; n: exactly n passes through
    #: ``faults`` (each kind n times, in a seeded order), the load running on past ``minutes``
    #: if they need it, then ``tail`` seconds more — a short run that hits every kind it names
    rounds: int = 0


def run(args: SoakPlan, workdir: Path, say: Callable[[str], None] = lambda _: None) -> SoakFigures:
    figures = SoakFigures(minutes=args.minutes, rate=args.rate, partitions=PARTITIONS)
    rng = random.Random(args.seed)
    # with ``rounds``, room for faults that outlast ``minutes`` (only the queries sent count)
    seconds = args.minutes * 60 + (600 if args.rounds else 0)
    pool = make_queries(int(args.rate * seconds * 1.05) + 50, prefix="q-soak")
    server = ArmServer({q.query_id: q for q in pool}, ACCURACY, parse_errors=0.02).start()
    broker = ProxiedBroker()
    broker.log_path = workdir / "broker.log"
    broker.start()
    pg = PrivatePostgres()
    pg_proxy = TcpProxy(pg.port)
    topics = isolated_stream_names(f"soak-{uuid.uuid4().hex[:8]}")
    service_url = f"postgresql://postgres@127.0.0.1:{pg_proxy.port}/postgres"
    env = service_env(
        broker.bootstrap,
        topics,
        service_url,
        SCHEMA,
        workdir / "unused.yaml",  # each process has a config of its own (SoakFleet.spawn)
        poll_max_records=25,
        labels_poll_max_records=50,
        log_poll_seconds=1.0,
    )
    fleet = SoakFleet(env, server, workdir)
    watch = Watch(fleet)
    engine = make_engine(pg.url, SCHEMA, poolclass=sa.pool.NullPool)
    load: LoadGenerator | None = None
    try:
        for _ in range(2):  # the first two instances import (standing by) while Postgres is made
            fleet.spawn()
        pg.init()
        upgrade(pg.url, SCHEMA)
        create_topics(broker.bootstrap, [v for k, v in topics.items() if k.endswith("_topic")], 6)
        load = LoadGenerator(broker.bootstrap, topics, pool, args.rate, args.seed + 1)
        for _ in range(2):
            fleet.start()
            wait_for(lambda: fleet.serving(sorted(fleet.live)), 120)
        say(f"serving: {', '.join(sorted(fleet.live))}")
        started = time.time()
        end = started + args.minutes * 60
        watch.thread.start()
        load.start()
        _schedule(
            args,
            figures,
            fleet,
            watch,
            Faults(broker, pg, pg_proxy, fleet, server, watch, rng),
            engine,
            end,
            say,
        )
        load.finish()
        say(f"load done: {len(load.queries)} queries, {load.labels} labels; draining")
        _drain(figures, broker, topics, engine, load, fleet, say)
        watch.stop.set()
        final = sorted(fleet.live)
        for name in final:
            if wait_for(lambda n=name: _ready(fleet.ports[n]), 30):
                figures.final_ready.append(name)
        fleet.terminate(final)
        figures.exit_codes = [fleet.stopped[n] for n in sorted(fleet.stopped)]
        figures.final_instances = len(final)
        figures.processes_started = fleet.started
        figures.kills = figures.restarts = len(fleet.killed)
        truth = {q.query_id: q for q in pool if q.query_id in load.queries}
        _count(figures, engine, server, fleet, truth, final)
        with engine.connect() as conn:
            figures.arm_failures = conn.execute(
                sa.text(
                    "SELECT count(*) FROM decisions "
                    "WHERE status = 'llm_error' OR fallback_arm IS NOT NULL"
                )
            ).scalar_one()
        figures.decision_events_missing = len(
            set(truth) - set(event_keys(broker.bootstrap, topics["decisions_topic"]))
        )
        dead = {
            (b["topic"], b["partition"], b["offset"])
            for b in (json.loads(m.value) for m in read_all(broker.bootstrap, topics["dlq_topic"]))
        }
        figures.malformed_published = len(load.malformed)
        figures.malformed_missing_from_dlq = len(load.malformed - dead)
        figures.failed_sends = load.failed_sends
        _recovery(figures, engine, load)
        _readiness(figures, watch)
        _memory(figures, fleet, watch, started)
        figures.seconds = round(time.time() - started, 1)
        return figures
    finally:
        watch.stop.set()
        if load is not None:
            load.stop.set()
        fleet.close()
        server.kill()
        engine.dispose()
        with contextlib.suppress(Exception):
            os.kill(broker.process.pid, signal.SIGCONT)
        broker.stop()
        pg.destroy()


def _schedule(args, figures, fleet, watch, faults, engine, end, say) -> None:
    """Faults one at a time, each once the decisions flowed again after the one before: while
    they fit before ``end``, or ``args.rounds`` passes through ``args.faults`` however long
    they take (and ``args.tail`` seconds of load at least after the last one's return)."""
    rng = random.Random(args.seed + 2)
    lo, hi = args.fault_seconds
    kinds: list[str] = []
    left = args.rounds * len(args.faults) if args.rounds else None  # None: until ``end``
    time.sleep(args.warmup if left else min(args.warmup, max(0.0, end - time.time())))
    while left is None or left > 0:
        if not kinds:
            kinds = list(args.faults)
            rng.shuffle(kinds)
        kind = kinds.pop(0)
        seconds = fault_seconds(kind, rng, lo, hi)
        if left is None and time.time() + seconds + args.tail > end:
            break
        fault = Fault(kind)
        faults.inflict(fault, seconds, say)
        figures.faults.append(fault)
        if left is not None:
            left -= 1
            end = max(end, fault.returned + args.tail)
        before = decided_count(engine) or 0
        wait_for(lambda b=before: (decided_count(engine) or 0) > b, 60)
        _tend(figures, fleet, say, until=time.time() + args.gap)
    while time.time() < end:
        _tend(figures, fleet, say, until=min(end, time.time() + 5))


def _tend(figures, fleet, say, until: float) -> None:
    """Keep a warm spare ready; restart an instance that exited by itself (and say so)."""
    while time.time() < until:
        for name, process in list(fleet.live.items()):
            if not process.alive:
                code = process.process.returncode
                figures.unexpected_exits.append(f"{name} exited {code}: {process.log()[-300:]}")
                say(f"  {name} exited by itself ({code}); restarting")
                fleet.live.pop(name)
                fleet.killed[name] = time.time()
                fleet.start()
        fleet.tend(1)
        time.sleep(0.5)


def _drain(figures, broker, topics, engine, load, fleet, say) -> None:
    n = len(load.queries)
    queries_in = n + sum(1 for t, _, _ in load.malformed if t == topics["queries_topic"])
    labels_in = load.labels + sum(1 for t, _, _ in load.malformed if t == topics["labels_topic"])

    def done() -> bool:
        try:
            with engine.connect() as conn:
                decided, rewarded, pending = conn.execute(
                    sa.text(
                        "SELECT (SELECT count(*) FROM decisions), "
                        "(SELECT count(*) FROM decisions WHERE reward_seq IS NOT NULL), "
                        "(SELECT count(*) FROM pending_labels)"
                    )
                ).one()
        except sa.exc.DBAPIError:
            return False
        return (
            (decided, rewarded, pending) == (n, n, 0)
            and committed_total(broker.bootstrap, topics["queries_topic"], topics["queries_group"])
            == queries_in
            and committed_total(broker.bootstrap, topics["labels_topic"], topics["labels_group"])
            == labels_in
        )

    clock = time.monotonic()
    if not wait_for(done, 300, 1.0):
        say("  not drained within 300 s: the figures say what is missing")
    say(f"  drained in {time.monotonic() - clock:.0f} s")
    figures.queries = n
    figures.labels_published = load.labels


def _recovery(figures: SoakFigures, engine: sa.Engine, load: LoadGenerator) -> None:
    """Per fault: from its return to the first decision stored after it, and to the decision
    of the last query sent before it."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT query_id, decided_at FROM decisions")).all()
    decided = sorted(r.decided_at.timestamp() for r in rows)
    by_query = {r.query_id: r.decided_at.timestamp() for r in rows}
    for fault in figures.faults:
        after = [t for t in decided if t > fault.returned]
        fault.first_decision_s = round(after[0] - fault.returned, 2) if after else None
        before = [by_query.get(q) for q, sent in load.queries.items() if sent <= fault.returned]
        if before and None not in before:
            fault.backlog_s = round(max(0.0, max(before) - fault.returned), 2)


def _readiness(figures: SoakFigures, watch: Watch) -> None:
    figures.probes = len(watch.probes)
    for probe in watch.probes:
        truth = watch.truth(probe)
        if truth is None:
            continue
        figures.probes_counted += 1
        if probe.ready == truth:
            figures.probes_truthful += 1
        elif len(figures.probes_wrong) < 12:
            stamp = time.strftime("%H:%M:%S", time.localtime(probe.at))
            figures.probes_wrong.append(f"{stamp} {probe.instance}: {probe.ready}, truth {truth}")


def _memory(figures: SoakFigures, fleet: SoakFleet, watch: Watch, started: float) -> None:
    """Each instance that ran from minute 5 (a quarter of a shorter run) to the end: its
    resident memory then and at its last sample."""
    span = time.time() - started
    since = min(300.0, span / 4)
    for name, samples in watch.rss.items():
        t0 = fleet.started_at.get(name, started) + since
        later = [(t, kb) for t, kb in samples if t >= t0]
        if name in fleet.stopped and later and later[-1][0] - t0 >= span / 2:
            figures.rss[name] = (round(since / 60, 1), later[0][1], later[-1][1])
            by_minute: dict[int, int] = {}
            for t, kb in samples:
                by_minute.setdefault(int((t - started) // 60), kb)
            figures.rss_by_minute[name] = [by_minute[m] for m in sorted(by_minute)]


def broken(f: SoakFigures) -> list[str]:
    """The invariants this run broke (empty: none)."""
    checks = {
        "a query without its decision": f.lost_decisions == 0 and f.decisions == f.queries,
        "an LLM call for a decision already made": f.calls_after_decided == 0
        and f.discarded_elsewhere_logged == 0,
        "a label never applied": f.lost_rewards == 0 and f.labels_pending == 0,
        "a reward applied twice": f.duplicate_reward_seqs == 0 and f.policy_update_mismatches == 0,
        "a label left beside its decision": f.labels_pending_beside_decision == 0,
        "an instance's policy differs from the log's replay": f.max_policy_difference <= 1e-9
        and f.restored_policy_difference <= 1e-9
        and f.final_watermark_lag == 0
        and f.final_policies == f.final_instances,
        "SIGTERM did not exit 0 after a full checkpoint": all(c == 0 for c in f.exit_codes)
        and f.final_checkpoint_updates == f.queries,
        "a decision never published": f.decision_events_missing == 0,
        "a malformed event missing from the DLQ": f.malformed_missing_from_dlq == 0,
        "an instance exited by itself": not f.unexpected_exits,
        "an instance not ready at the end": len(f.final_ready) == f.final_instances,
    }
    return [what for what, ok in checks.items() if not ok]
