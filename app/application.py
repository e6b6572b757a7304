"""Owns the service's lifecycle: build everything, run both consumers, stop cleanly.

    service = Application.build(Settings())      # loads config, restores the policy
    service.start(); ...; service.stop()     # or service.run_forever() until SIGINT/SIGTERM

Several instances may run on one database and in one consumer group: they learn one policy
through Postgres (:mod:`service.log`); a :class:`LogFollower` thread applies what the
others store, and a :class:`Checkpointer` thread stores the policy's checkpoints.

On stop: both consumers stop polling and finish what they hold (its calls, commits and offsets),
then the policy catches up with the log and, on the checkpoint writer, is checkpointed.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field

import sqlalchemy as sa
from kafka import KafkaProducer
from sqlalchemy.engine import Engine
from threadpoolctl import threadpool_limits

from app.status import (
    ProgressLogger,
    current_counts,
    silence_known_noise,
    start_block,
    waiting_for,
)
from consumers.batch import run_in_thread
from consumers.kafka_io import (
    TopicsChanged,
    check_topics,
    ensure_topics,
    make_consumer,
    make_producer,
    probe_topics,
    quiet_kafka_logs,
)
from consumers.labels import LabelConsumer
from consumers.queries import QueryConsumer
from door.front import Front
from door.server import Door, DoorServer
from service.config import AppConfig, load_config
from service.embedding import Embedder
from service.health import PROBE_TIMEOUT_S, Health, Prober
from service.learning import LivePolicy
from service.llm.gateway import Gateway
from service.log.checkpoints import Checkpointer
from service.log.follower import LogFollower
from service.log.transaction import LearningLog
from service.metrics import DEPENDENCY_UP, MetricsServer
from service.pacing import BudgetPacer
from service.pipeline import Decider, Learner
from service.reward import RewardSettings, task_scoring
from service.settings import Settings
from service.storage import make_engine

log = logging.getLogger(__name__)
#: How long stopping lets a consumer finish a rebalance it is in before it leaves its group.
REBALANCE_BEFORE_LEAVING_S = 10.0
#: What readiness waits for: the broker (both consumers use it) and Postgres (everything does).
DEPENDENCIES = ("kafka", "postgres")


def dependencies(settings: Settings) -> tuple[str, ...]:
    """The dependencies this instance's roles need: an HTTP-only instance, no broker."""
    return DEPENDENCIES if settings.kafka_consumers else ("postgres",)


#: How long stopping waits for a checkpoint the Checkpointer is storing, and then the final
#: checkpoint for it (still not done: the final checkpoint fails, and serve exits 1).
FINAL_CHECKPOINT_WAIT_S = 60.0


class SchemaMissing(RuntimeError):
    pass


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaMissing` unless the database was migrated to this code's revision."""
    from service.migrate import schema_problem

    with engine.connect() as conn:
        problem = schema_problem(conn)
    if problem is not None:
        raise SchemaMissing(problem)


def commits_are_durable(engine: Engine) -> bool:
    """Whether Postgres makes a COMMIT durable before acknowledging it; warns if not. With
    ``synchronous_commit = off`` a crash of the server drops the last acknowledged
    transactions — decisions and rewards whose Kafka offsets are committed by then, so their
    queries would never be decided and their labels never applied."""
    with engine.connect() as conn:
        setting = conn.execute(sa.text("SHOW synchronous_commit")).scalar()
    if setting == "off":
        log.warning(
            "Postgres has synchronous_commit = off: a crash of the database server can lose "
            "decisions and rewards already acknowledged (and their Kafka offsets committed); "
            "set it to on for metallm's role or database"
        )
        return False
    return True


def dependency_changed(dependency: str, up: bool) -> None:
    """Export a dependency's new state; while the broker is down, silence kafka-python's own
    line per reconnection attempt (the health line said it, and will say when it is back)."""
    DEPENDENCY_UP.labels(dependency).set(1 if up else 0)
    if dependency == "kafka":
        quiet_kafka_logs(not up)


@dataclass
class Application:
    settings: Settings
    config: AppConfig
    engine: Engine
    live: LivePolicy
    decider: Decider
    learner: Learner
    learning_log: LearningLog  # the engine-holding side of `live`: appends, restore, checkpoints
    queries: QueryConsumer | None = None
    labels: LabelConsumer | None = None
    crashed: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _producer: KafkaProducer | None = None
    metrics_server: MetricsServer | None = None
    follower: LogFollower | None = None
    checkpointer: Checkpointer | None = None
    checkpoint_failed: bool = False
    progress: ProgressLogger | None = None
    blas_limits: threadpool_limits | None = None  # BLAS pinned to one thread, until stop()
    health: Health = field(default_factory=lambda: Health(DEPENDENCIES, dependency_changed))
    probers: list[Prober] = field(default_factory=list)
    topics_changed: TopicsChanged | None = None  # found by the Kafka probe: serve stops
    probe_engine: Engine | None = None  # Postgres's probe: a fresh connection each time
    door: DoorServer | None = None  # the HTTP door, when METALLM_HTTP_PORT is set

    @classmethod
    def build(
        cls,
        settings: Settings,
        config: AppConfig | None = None,
        embedder: Embedder | None = None,
        gateway: Gateway | None = None,
        health_endpoint: tuple[Health, MetricsServer | None] | None = None,
    ) -> Application:
        """Check the schema, build the arms, restore the policy, load the embedding model.
        ``config``, ``embedder`` and ``gateway`` default to those the settings describe. A
        gateway passed in belongs to the service once built (:meth:`stop` closes it); if the
        build fails, it is left to the caller, and everything the build made is closed. A
        ``health_endpoint`` started before the build (see :func:`health_endpoint`) is the
        service's once built (and the caller's if the build fails)."""
        config = config or load_config(settings.config)
        silence_known_noise(config)  # before the arms: loading a local model logs
        engine = make_engine(settings.database_url, settings.database_schema)  # connects lazily
        # The policy's rank-one updates are small BLAS calls: extra BLAS threads only contend
        # (measured 20x slower with 2 threads on a busy 2-core machine), and OpenBLAS's idle
        # threads spin, taking a core's time from embedding (pipeline_throughput, (b)). From
        # here, so that restoring the policy replays rewards as the live service applies them;
        # undone by stop().
        blas = threadpool_limits(1, user_api="blas")
        built_gateway = None
        try:
            check_schema(engine)
            commits_are_durable(engine)
            DEPENDENCY_UP.clear()  # this instance's dependencies only, each once it is used
            DEPENDENCY_UP.labels("postgres").set(1)  # it answered the schema check
            # the arms before the policy and the model: a missing API key or SDK extra is
            # told at once, not after restoring the policy and loading the model
            if gateway is None:
                gateway = built_gateway = Gateway(config)
            service = cls._assemble(settings, config, engine, embedder, gateway, blas)
            if health_endpoint is not None:
                service.health, service.metrics_server = health_endpoint
            else:
                service.health = Health(dependencies(settings), dependency_changed)
            return service
        except BaseException:  # not built (no schema, Postgres down…): leave nothing behind
            if built_gateway is not None:
                try:
                    built_gateway.close()
                except Exception:  # the build's own error is the one to tell
                    log.warning("closing the arms of a failed build failed", exc_info=True)
            engine.dispose()
            blas.restore_original_limits()
            raise

    @classmethod
    def _assemble(
        cls,
        settings: Settings,
        config: AppConfig,
        engine: Engine,
        embedder: Embedder | None,
        gateway: Gateway,
        blas: threadpool_limits,
    ) -> Application:
        budget = None
        if settings.budget_usd_per_query is not None:
            budget = BudgetPacer(
                settings.budget_usd_per_query,
                settings.cost_unit_usd,
                settings.budget_lr,
                lam0=settings.reward_lambda,
            )
        live = LivePolicy(
            settings.policy,
            settings.policy_params,
            budget,
            context=settings.context_builder(config.declared_features()),
            cost_unit=settings.cost_unit_usd,
            conservative=config.conservative(),
        )
        learning_log = LearningLog(
            engine,
            live,
            instance=settings.instance_id,
            checkpoint_every=settings.checkpoint_every,
            checkpoint_min_seconds=settings.checkpoint_min_seconds,
            draws_seed=settings.draws_seed,
        )
        learning_log.name.claim()  # or InstanceNameTaken
        try:
            learning_log.restore()
            rewards = RewardSettings(
                settings.reward_lambda, settings.cost_unit_usd, task_scoring(config.tasks)
            )
            embedder = embedder or Embedder.from_settings(settings)
            decider = Decider(
                config, learning_log, embedder, gateway, rewards, settings.too_long_text
            )
        except BaseException:
            learning_log.close()  # its name (and any role) to the next start
            raise
        learner = Learner(learning_log, rewards, settings.pending_label_ttl_seconds)
        return cls(settings, config, engine, live, decider, learner, learning_log, blas_limits=blas)

    def start(self) -> None:
        s = self.settings
        silence_known_noise()
        if s.kafka_consumers:
            self._make_consumers()
            DEPENDENCY_UP.labels("kafka").set(1)  # it answered the topics' checks
        if self.metrics_server is not None:  # started before the build, to say "restoring"
            self.metrics_server.serve_readiness(self.ready)
        elif s.metrics_port is not None:
            self.metrics_server = MetricsServer(s.metrics_port, self.ready).start()
            log.info("metrics on :%d (/metrics, /healthz, /readyz)", self.metrics_server.port)
        seconds = max(1, round(PROBE_TIMEOUT_S))
        self.probe_engine = make_engine(  # unpooled: a pooled connection could be stale
            s.database_url,
            poolclass=sa.pool.NullPool,
            connect_args={"connect_timeout": seconds, "options": f"-cstatement_timeout={seconds}s"},
        )
        self.probers = [Prober(self.health, "postgres", self._probe_postgres).start()]
        if s.kafka_consumers:
            self.probers.append(Prober(self.health, "kafka", self._probe_kafka).start())
        self.follower = LogFollower(self.learning_log, s.log_poll_seconds).start()
        self.checkpointer = Checkpointer(self.learning_log.checkpoints).start()
        if self.queries is not None and self.labels is not None:
            self._threads = [
                run_in_thread(self._guard(self.queries), "metallm-queries"),
                run_in_thread(self._guard(self.labels), "metallm-labels"),
            ]
        if s.http_port is not None:
            self.door = self._make_door().start()
        log.info(self.describe())
        self.health.serving()
        labels = self.labels
        self.progress = ProgressLogger(
            lambda: current_counts(
                lambda: labels.stats.events if labels is not None else 0,
                lambda: self.live.policy.n_updates,
            ),
            s.progress_seconds,
        ).start()

    def _make_consumers(self) -> None:
        s = self.settings
        ensure_topics(s, [s.queries_topic, s.labels_topic, s.decisions_topic, s.dlq_topic])
        check_topics(s)  # co-partitioned queries and labels, or TopicMismatch
        producer = make_producer(s)
        self.queries = QueryConsumer(
            self.decider,
            make_consumer(s, s.queries_topic, s.queries_group),
            producer,
            s.decisions_topic,
            s.dlq_topic,
            s.group_commit_ms,
        )
        self.labels = LabelConsumer(
            self.learner,
            make_consumer(s, s.labels_topic, s.labels_group, s.labels_poll_max_records),
            producer,
            s.dlq_topic,
            expire_every_s=s.pending_label_expire_every_seconds,
        )
        self._producer = producer

    def _make_door(self) -> DoorServer:
        s = self.settings
        front = Front(self.decider, self.learner, s.instance_id, s.http_timeout_seconds)
        door = Door(
            front,
            self.ready,
            s.api_key_list(),
            s.http_max_body_bytes,
            s.http_max_in_flight,
            s.http_timeout_seconds,
        )
        return DoorServer(door, s.http_host, s.http_port or 0)

    def describe(self) -> str:
        """The start block: config, tasks, arms, database, topics, instance, policy, metrics."""
        s = self.settings
        return start_block(
            s,
            self.config,
            policy=(
                f"{s.policy} {json.dumps(s.policy_params)}, restored with "
                f"{self.live.policy.n_updates} rewards learned"
            ),
            context=self.live.context.spec,
            metrics_port=None if self.metrics_server is None else self.metrics_server.port,
            door=None if self.door is None else f"http://{self.door.host}:{self.door.port}/v1",
        )

    def _guard(self, consumer):
        def run() -> None:
            try:
                consumer.run()
            except Exception:
                log.exception("%s consumer crashed", consumer.name)
                self.crashed.set()

        return run

    def ready(self) -> bool:
        """Serving, the roles' parts running (both consumers, the door), and the dependencies
        they need answering their probes."""
        if self.crashed.is_set():
            return False
        if self.settings.kafka_consumers and not (
            self._threads and all(t.is_alive() for t in self._threads)
        ):
            return False
        if self.settings.http_port is not None and not (self.door and self.door.running):
            return False
        return self.health.ready()

    def _probe_kafka(self) -> None:
        try:
            probe_topics(self.settings, PROBE_TIMEOUT_S)
        except TopicsChanged as exc:  # it answers, with other topics: stop, saying what to do
            if self.topics_changed is None:
                log.error("the queries or labels topic changed under the service: stopping")
            self.topics_changed = exc

    def _probe_postgres(self) -> None:
        assert self.probe_engine is not None
        with self.probe_engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def stop(self) -> None:
        """Stop polling, finish the events held, commit, checkpoint, close."""
        self.health.stopping()
        try:
            self._stop_consuming()
        finally:  # the instance's name and roles, the arms and the connections, come what may
            self.learning_log.close()
            self.decider.close()
            self.decider.gateway.close()
            self.engine.dispose()
            if self.blas_limits is not None:
                self.blas_limits.restore_original_limits()
        log.info("stopped")

    def _stop_consuming(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.door is not None:
            with waiting_for("the HTTP door's requests in flight"):
                self.door.stop()
                self.door.door.front.close()  # the decisions of its last calls stored
        for consumer in (self.queries, self.labels):
            if consumer is not None:
                consumer.stop()
        if self._threads:
            log.info(
                "stopping: the consumers finish the batches in hand (their calls, decisions, "
                "rewards and offsets)"
            )
        for thread in self._threads:  # named metallm-queries and metallm-labels
            with waiting_for(f"the {thread.name.removeprefix('metallm-')} consumer's batch"):
                thread.join()
        with waiting_for("the Kafka consumers to leave their groups"):
            for consumer in (self.queries, self.labels):
                if consumer is not None:
                    consumer.leave(REBALANCE_BEFORE_LEAVING_S)
        if self._producer is not None:
            with waiting_for("the producer to deliver what it holds"):
                self._producer.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        for prober in self.probers:
            prober.stop()
        if self.probe_engine is not None:
            self.probe_engine.dispose()
        if self.follower is not None:
            self.follower.stop()
        if self.checkpointer is not None:
            with waiting_for("the policy checkpoint being stored"):
                self.checkpointer.stop(FINAL_CHECKPOINT_WAIT_S)
        try:
            self.learning_log.catch_up()  # what the log holds that this instance has not applied
            if self.live.policy.n_updates:
                log.info("stopping: storing the final policy checkpoint (on the writer)")
                # on the checkpoint writer only, after the one being stored (if any)
                self.learning_log.checkpoints.save(wait_s=FINAL_CHECKPOINT_WAIT_S)
        except Exception:  # the rewards are in Postgres: the next start re-applies them
            self.checkpoint_failed = True
            log.exception("the final policy checkpoint failed")

    def run_forever(self, stop: threading.Event | None = None) -> int:
        """Serve until SIGINT/SIGTERM (or ``stop`` is set), then stop cleanly. Exit code 1 if
        a consumer crashed or the final checkpoint failed."""
        stop = stop or stop_on_signals()
        if not stop.is_set():  # a signal during start-up: stop without serving
            settle_heap()  # before the Kafka clients' threads start: the pass blocks them
            self.start()
        # polled, not waited on: Event.wait holds the event's lock at moments, and the signal
        # handler that sets it runs on this very thread (it would wait for itself for ever)
        while not stop.is_set() and not self.crashed.is_set() and self.topics_changed is None:
            time.sleep(0.2)
        self.stop()
        if self.topics_changed is not None:
            raise self.topics_changed  # the command line tells it, with its exit code
        return 1 if self.crashed.is_set() or self.checkpoint_failed else 0


def settle_heap() -> None:
    """Exempt what the build made (modules, the config, the model, the restored policy) from
    the cyclic garbage collector's later passes, as a process that serves from here on. Each
    full pass scanned all of it: ~130–150 ms during which no request moved (the door's p99;
    ``benchmarks/http_door.py``). Reference counting still frees those objects; only cycles
    among them are never collected, and they live as long as the process anyway. Called once
    per process (``metallm serve``), not by a library user's start."""
    gc.collect()
    gc.freeze()


def health_endpoint(settings: Settings) -> tuple[Health, MetricsServer | None]:
    """The health state and, unless metrics are off, its endpoint, started before the build so
    that /healthz answers and /readyz says "not ready" while the policy is restored."""
    health = Health(dependencies(settings), dependency_changed)
    if settings.metrics_port is None:
        return health, None
    server = MetricsServer(settings.metrics_port, health.ready).start()
    log.info("metrics on :%d (/metrics, /healthz, /readyz)", server.port)
    return health, server


def stop_on_signals() -> threading.Event:
    """An event that SIGINT and SIGTERM set. Installed before the service is built, so that a
    signal during start-up (loading the model, restoring the policy) stops it cleanly instead
    of killing it. A second signal of the same kind ends the process at once."""
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info(
            "received %s, stopping (send it again to exit at once)", signal.Signals(signum).name
        )
        stop.set()
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process, stuck or not

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop
