"""Readiness tells the truth: false while the broker or Postgres cannot be reached and while the
policy is restored, true again when they answer (the work resumes by itself), one log line per
change of state; topics that changed under a serving service stop it with a one-line error and
exit code 4."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from kafka.errors import KafkaError

from consumers.kafka_io import create_topics, delete_topics, ensure_topics, probe_topics
from service.health import PROBE_TIMEOUT_S
from service.metrics import DEPENDENCY_UP
from service.migrate import upgrade
from service.settings import isolated_stream_names
from tests.conftest import DATABASE_URL
from tests.faults.harness import (
    ArmServer,
    ServiceProcess,
    arm_config,
    build_service,
    make_queries,
    progress,
    publish,
    service_env,
    wait_until,
    write_config,
)
from tests.faults.test_postgres_outage import ARMS
from tests.helpers import settings_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

TOPICS = isolated_stream_names("health")  # on a broker of the test's own


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def up(dependency: str) -> float:
    return DEPENDENCY_UP.labels(dependency)._value.get()


def kafka_io_threads() -> int:
    return sum(t.name.startswith("kafka-io") for t in threading.enumerate())


def health_lines(caplog, dependency: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "service.health" and r.getMessage().startswith(dependency)
    ]


def test_readiness_follows_a_paused_broker(own_broker, pg_schema, engine, caplog):
    bootstrap = own_broker.bootstrap
    settings = settings_for(bootstrap, TOPICS, pg_schema, DATABASE_URL, poll_max_records=20)
    ensure_topics(settings, [TOPICS["queries_topic"], TOPICS["labels_topic"]])
    queries = make_queries(80, prefix="q-hb")
    caplog.set_level(logging.INFO)
    with ArmServer({q.query_id: q for q in queries}, {"cheap": 0.6, "strong": 0.9}) as server:
        service = build_service(settings, arm_config(server, ARMS))
        service.start()
        port = service.metrics_server.port
        pid = own_broker.process.pid
        try:
            assert status(port, "/readyz") == 200
            publish(
                bootstrap,
                TOPICS["queries_topic"],
                [(q.query_id.encode(), q.event()) for q in queries[:40]],
            )
            wait_until(lambda: progress(engine)[0] == 40, 60, "40 decisions")
            io_threads = kafka_io_threads()
            os.kill(pid, signal.SIGSTOP)
            try:
                paused = time.monotonic()
                wait_until(lambda: not service.ready(), 10, "readiness false")
                assert time.monotonic() - paused < 6
                assert status(port, "/readyz") == 503
                assert status(port, "/healthz") == 200  # alive: it recovers by itself
                assert up("kafka") == 0 and up("postgres") == 1
                kafka_before = len([r for r in caplog.records if r.name.startswith("kafka")])
                time.sleep(6)  # the library's retries meanwhile are not logged
                kafka_during = [r for r in caplog.records if r.name.startswith("kafka")]
                assert len(kafka_during) == kafka_before
            finally:
                os.kill(pid, signal.SIGCONT)
            wait_until(service.ready, 20, "readiness true again")
            assert status(port, "/readyz") == 200 and up("kafka") == 1
            # each failed probe's half-built admin client stopped its IO thread
            assert kafka_io_threads() <= io_threads
            publish(
                bootstrap,
                TOPICS["queries_topic"],
                [(q.query_id.encode(), q.event()) for q in queries[40:]],
            )
            wait_until(lambda: progress(engine)[0] == 80, 60, "the work resumed")
        finally:
            os.kill(pid, signal.SIGCONT)
            service.stop()
    lines = health_lines(caplog, "kafka")
    assert len(lines) == 2, lines  # lost, back: one line each
    assert lines[0].startswith("kafka cannot be reached")
    assert re.fullmatch(r"kafka answers again after \d+\.\d s", lines[1])
    assert not service.crashed.is_set()


class FreezeOn(logging.Handler):
    """Stops the broker (SIGSTOP) when kafka-python logs a line containing ``words``: on the
    client's IO thread, before the client's next step."""

    def __init__(self, pid: int, words: str) -> None:
        super().__init__()
        self.pid = pid
        self.words = words
        self.fired = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired and self.words in record.getMessage():
            os.kill(self.pid, signal.SIGSTOP)
            self.fired = True


@pytest.mark.parametrize("moment", ["before it", "once it bootstrapped", "after a late answer"])
def test_a_kafka_probe_ends_within_its_timeout_when_the_broker_freezes(own_broker, moment):
    """A frozen broker accepts connections and never answers, and kafka-python bounds each
    step of a probe on its own: frozen once the probe has bootstrapped, the describe request
    would wait for its new connection's setup timeout (10 s); frozen after answering the
    bootstrap's version request late (a second before the timeout), the bootstrap's metadata
    request would wait its own 3 s. The probe must raise by its timeout (give or take closing
    its client) whatever the moment, and leave no IO thread behind."""
    settings = settings_for(own_broker.bootstrap, TOPICS, "unused", DATABASE_URL)
    ensure_topics(settings, [TOPICS["queries_topic"], TOPICS["labels_topic"]])
    probe_topics(settings, PROBE_TIMEOUT_S)  # it answers
    io_threads = kafka_io_threads()
    pid = own_broker.process.pid
    net_log = logging.getLogger("kafka.net")  # "Bootstrap complete: …", "<connection>: Connected"
    level = net_log.level
    net_log.setLevel(logging.INFO)
    if moment == "once it bootstrapped":
        freeze = FreezeOn(pid, "Bootstrap complete")
    else:
        freeze = FreezeOn(pid, ": Connected")  # the version request answered
        os.kill(pid, signal.SIGSTOP)
    thaw = threading.Timer(PROBE_TIMEOUT_S - 1.0, os.kill, (pid, signal.SIGCONT))
    net_log.addHandler(freeze)
    try:
        began = time.monotonic()
        if moment == "after a late answer":
            thaw.start()
        with pytest.raises(KafkaError):
            probe_topics(settings, PROBE_TIMEOUT_S)
        took = time.monotonic() - began
    finally:
        thaw.cancel()
        net_log.removeHandler(freeze)
        net_log.setLevel(level)
        os.kill(pid, signal.SIGCONT)
    assert took < PROBE_TIMEOUT_S + 2  # kafka-python's own bounds: 10 s, 3 s, 5.5 s
    assert kafka_io_threads() == io_threads
    if moment == "after a late answer" and not freeze.fired:  # a loaded machine's broker
        pytest.skip("the thawed broker answered only after the probe's deadline")
    assert freeze.fired == (moment != "before it")


def test_readiness_false_while_postgres_is_down(broker, topics, private_pg):
    pg = private_pg
    schema = f"health_{uuid.uuid4().hex[:8]}"
    upgrade(pg.url, schema)
    settings = settings_for(broker, topics, schema, pg.url)
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    with ArmServer({}, {"cheap": 0.6, "strong": 0.9}) as server:
        service = build_service(settings, arm_config(server, ARMS))
        service.start()
        port = service.metrics_server.port
        try:
            wait_until(service.ready, 10, "ready")
            pg.stop("fast")
            wait_until(lambda: status(port, "/readyz") == 503, 10, "readiness false")
            assert status(port, "/healthz") == 200 and up("postgres") == 0
            pg.start()
            wait_until(lambda: status(port, "/readyz") == 200, 20, "readiness true again")
            assert up("postgres") == 1
        finally:
            if not pg.running():
                pg.start()
            service.stop()
        assert not service.crashed.is_set()


def serve_process(broker, topics, pg_schema, tmp_path, **settings) -> ServiceProcess:
    config = write_config(tmp_path / "config.yaml", arm_config(ArmServer({}, {}), ARMS))
    env = service_env(broker, topics, DATABASE_URL, pg_schema, config, **settings)
    return ServiceProcess(env, tmp_path / "serve.log").start()


def metrics_port(process: ServiceProcess) -> int:
    found: list[int] = []

    def logged() -> bool:
        match = re.search(r"metrics on :(\d+)", process.log())
        if match:
            found.append(int(match.group(1)))
        return bool(match) or not process.alive

    wait_until(logged, 60, "the metrics port", interval=0.01)
    assert found, process.log()
    return found[0]


def test_not_ready_while_restoring_then_ready(broker, topics, pg_schema, tmp_path):
    create_topics(broker, [topics["queries_topic"], topics["labels_topic"]], 6)
    process = serve_process(broker, topics, pg_schema, tmp_path)
    try:
        port = metrics_port(process)
        # the endpoint starts before the build: alive, not ready while it restores
        assert status(port, "/healthz") == 200
        assert status(port, "/readyz") == 503
        wait_until(lambda: process.serving, 60, "serving")
        wait_until(lambda: status(port, "/readyz") == 200, 10, "ready")
    finally:
        assert process.terminate() == 0


def test_serve_stops_when_its_topics_change(broker, topics, pg_schema, tmp_path):
    """What a restart of the in-memory local broker looks like: the topics are gone, then
    recreated with other partition counts."""
    queries, labels = topics["queries_topic"], topics["labels_topic"]
    create_topics(broker, [queries, labels], 2)
    process = serve_process(broker, topics, pg_schema, tmp_path, topic_partitions=2)
    try:
        port = metrics_port(process)
        wait_until(lambda: status(port, "/readyz") == 200, 60, "ready")
        delete_topics(broker, [queries, labels])
        create_topics(broker, [queries, labels], 3)
        wait_until(lambda: not process.alive, 30, "serve to stop")
    finally:
        process.kill()
    assert process.process.returncode == 4
    errors = [line for line in process.log().splitlines() if line.startswith("metallm: ")]
    assert len(errors) == 1, process.log()[-3000:]
    assert "topics changed while serving" in errors[0]
    assert "then start serve again" in errors[0]
