"""Kafka clients configured from settings (kafka-python), and the topic helpers that the
service, the bench, the benchmarks and the tests share.

The topic helpers take a :data:`KafkaTarget`: the service's settings (with their SASL/SSL
options), or bootstrap servers as a string (plaintext, as a test's or a benchmark's own broker).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import (
    KafkaTimeoutError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    for_code,
)
from kafka.net.compat import KafkaNetClient
from kafka.net.manager import KafkaConnectionManager
from kafka.util import Timer

from service.settings import Settings

log = logging.getLogger(__name__)


def client_options(settings: Settings) -> dict[str, Any]:
    """Connection options shared by every client (SASL/SSL pass through from settings)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap.split(","),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        password = settings.kafka_sasl_password
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    for name in ("cafile", "certfile", "keyfile"):
        path = getattr(settings, f"kafka_ssl_{name}")
        if path is not None:
            options[f"ssl_{name}"] = str(path)
    return options


class SteadyConsumer(KafkaConsumer):
    """A ``KafkaConsumer`` whose :meth:`poll` does not spin while the broker does not answer.

    kafka-python 3.0's ``poll`` runs rounds (``_poll_once``) until its timeout, each round's wait
    for fetched data capped by the time to the group's next heartbeat. While a heartbeat is
    overdue — the broker frozen, or a connection that stays open but gets no answers — that cap
    is 0 and the rounds spin (about a thousand a second here), and each round leaves a callback
    on the fetch still in flight holding its timed-out wait: an exception with its traceback and
    frames, ~6 kB. They are reachable until that fetch ends, then cyclic garbage that only a
    full collection frees, which Python runs rarely once its oldest generation is large: a 30 s
    broker pause kept ~140 MB for the rest of an 8-minute soak (the soak's memory steps, issue
    25). So a round that returns nothing while a heartbeat is overdue is followed by
    a wait of ``retry_backoff_ms`` (within the poll's timeout), as kafka-python itself waits when
    it has nothing in flight: the rounds, and what they leave behind, are bounded by the
    outage's length over that backoff.
    """

    rounds = 0  # rounds run (``_poll_once``), for the test that pins the bound

    def _poll_once(self, timer: Timer, max_records: int, update_offsets: bool = True) -> dict:
        self.rounds += 1
        records = super()._poll_once(timer, max_records, update_offsets=update_offsets)
        if (
            not records
            and not timer.expired
            and self.config["group_id"] is not None
            and self._coordinator.time_to_next_poll() <= 0
        ):
            time.sleep(min(timer.timeout_ms, self.config["retry_backoff_ms"]) / 1000)
        return records


def make_consumer(
    settings: Settings, topic: str, group_id: str, max_poll_records: int | None = None
) -> KafkaConsumer:
    """A consumer that commits only when told to (after the database commit), taking at most
    ``max_poll_records`` events a poll (default ``METALLM_POLL_MAX_RECORDS``), that does not
    spin while the broker does not answer (:class:`SteadyConsumer`)."""
    return SteadyConsumer(
        topic,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=max_poll_records or settings.poll_max_records,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=600_000,
        **client_options(settings),
    )


def make_producer(settings: Settings) -> KafkaProducer:
    return KafkaProducer(acks="all", linger_ms=5, retries=5, **client_options(settings))


#: Where an admin helper connects: settings, or bootstrap servers ``"host:port[,host:port…]"``
KafkaTarget = Settings | str


def new_admin(deadline: float | None = None, **options: Any) -> KafkaAdminClient:
    """A ``KafkaAdminClient``, or its exception with the IO thread it started stopped:
    kafka-python's constructor starts that thread, then raises when the broker does not answer
    and leaves it running (one more thread per failed probe while the broker is down).

    With ``deadline`` (a ``time.monotonic()`` instant), the client's connections are cut at
    that instant by its own IO loop, so that the bootstrap in the constructor fails then:
    kafka-python bounds its steps one by one, not their sum (a bootstrap whose version request
    was answered gives its metadata request ``request_timeout_ms`` more)."""
    made: list[KafkaNetClient] = []

    def client(**configs: Any) -> KafkaNetClient:
        made.append(net_client := KafkaNetClient(**configs))
        if deadline is not None:  # the loop's thread is not started yet: no race
            net_client._net.call_at(deadline, lambda: _cut_off(net_client._manager))
        return net_client

    try:
        return KafkaAdminClient(**options, kafka_client=client)
    except BaseException:
        for half_built in made:
            half_built.close()
            half_built._net.stop()  # what KafkaAdminClient.close does after closing its client
        raise


def _cut_off(manager: KafkaConnectionManager) -> None:
    """Close every connection of a client's ``manager`` (on its IO loop): what waits on one
    fails at once."""
    for connection in list(manager._conns.values()):
        connection.close(KafkaTimeoutError("the deadline passed"))


@contextmanager
def admin_client(target: KafkaTarget) -> Iterator[KafkaAdminClient]:
    """An admin client for ``target``, closed on leaving."""
    if isinstance(target, Settings):
        options = client_options(target)
    else:
        options = {"bootstrap_servers": target.split(",")}
    admin = new_admin(**options)
    try:
        yield admin
    finally:
        admin.close()


def create_topics(target: KafkaTarget, topics: Iterable[str], partitions: int) -> list[str]:
    """Create those of ``topics`` that do not exist yet, with ``partitions`` partitions each, and
    wait until the broker shows them; returns the ones this call created. A topic that exists
    is left as it is (:func:`check_topics` tells whether the service can use it)."""
    wanted = list(dict.fromkeys(topics))
    with admin_client(target) as admin:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if not missing:
            return []
        try:
            admin.create_topics(
                {t: {"num_partitions": partitions, "replication_factor": 1} for t in missing}
            )
            log.info("created topics %s (%d partitions)", ", ".join(missing), partitions)
        except TopicAlreadyExistsError:
            pass  # made at the same moment by another process (the others still are)
        # the broker acknowledges a creation before its metadata shows the partitions
        admin.wait_for_topics(missing)
    return missing


def delete_topics(target: KafkaTarget, topics: Iterable[str]) -> list[str]:
    """Delete those of ``topics`` that exist; returns them."""
    wanted = list(dict.fromkeys(topics))
    with admin_client(target) as admin:
        existing = set(admin.list_topics())
        doomed = [t for t in wanted if t in existing]
        if doomed:
            admin.delete_topics(doomed)
    return doomed


def ensure_topics(settings: Settings, topics: list[str], partitions: int | None = None) -> None:
    """Create the service's topics that do not exist yet, with ``partitions`` partitions
    (default ``METALLM_TOPIC_PARTITIONS``): :func:`create_topics` with the settings'."""
    create_topics(settings, topics, settings.topic_partitions if partitions is None else partitions)


class TopicMismatch(RuntimeError):
    """The queries or the labels topic does not have ``METALLM_TOPIC_PARTITIONS`` partitions."""


def partition_counts(target: KafkaTarget, topics: list[str]) -> dict[str, int | None]:
    """Each topic's number of partitions (None: no such topic)."""
    with admin_client(target) as admin:
        return _described_counts(admin, topics)


def _described_counts(
    admin: KafkaAdminClient, topics: list[str], deadline: float | None = None
) -> dict[str, int | None]:
    described = {t["name"]: t for t in _describe(admin, topics, deadline)}
    counts: dict[str, int | None] = {}
    for topic in topics:
        info = described.get(topic)
        error = for_code(info["error_code"]) if info else UnknownTopicOrPartitionError
        if error is UnknownTopicOrPartitionError:
            counts[topic] = None
        elif info["error_code"]:
            raise error(f"describing topic {topic}")
        else:
            counts[topic] = len(info["partitions"])
    return counts


def _describe(
    admin: KafkaAdminClient, topics: list[str], deadline: float | None
) -> list[dict[str, Any]]:
    """``admin.describe_topics(topics)``, given up at ``deadline`` (``time.monotonic()``) with
    :class:`KafkaTimeoutError`: kafka-python's public call waits for the request however long
    its connection takes, so it is awaited on the client's IO loop with a timeout (the request
    left behind ends with the client)."""
    if deadline is None:
        return admin.describe_topics(topics)
    remaining_ms = (deadline - time.monotonic()) * 1000
    if remaining_ms <= 0:
        raise KafkaTimeoutError("the deadline passed before describing the topics")
    manager = admin._manager
    described = manager.call_soon(admin._get_cluster_metadata, topics)
    return manager.run(manager.wait_for, described, remaining_ms)["topics"]


def check_topics(settings: Settings) -> None:
    """Raise :class:`TopicMismatch` unless the queries and the labels topics both have
    ``METALLM_TOPIC_PARTITIONS`` partitions. They must be co-partitioned: queries and labels
    are keyed by ``query_id``, so a query and its label land in the same partition number,
    and the instance given that partition of one topic is given it of the other."""
    problem = topics_problem(
        settings, partition_counts(settings, [settings.queries_topic, settings.labels_topic])
    )
    if problem is not None:
        raise TopicMismatch(problem)


def topics_problem(settings: Settings, counts: dict[str, int | None]) -> str | None:
    """What is wrong with the queries and labels topics' partition ``counts`` (None: right)."""
    want = settings.topic_partitions
    if all(n == want for n in counts.values()):
        return None
    found = ", ".join(
        f"{t} does not exist" if n is None else f"{t} has {n}" for t, n in counts.items()
    )
    (other, *rest) = set(counts.values())
    if not rest and other is not None:  # the two agree with each other: the setting is off
        fix = f"set METALLM_TOPIC_PARTITIONS={other}, or recreate both topics with {want}"
    else:
        wrong = {t: n for t, n in counts.items() if n != want}
        verb = "create" if all(n is None for n in wrong.values()) else "recreate"
        fix = f"{verb} {' and '.join(wrong)} with {want}"
    return (
        "the queries and labels topics must be co-partitioned, with "
        f"METALLM_TOPIC_PARTITIONS={want} partitions each, but {found}: {fix}"
    )


class TopicsChanged(RuntimeError):
    """The queries or labels topic changed while serving (deleted, or recreated with other
    partitions: what a restart of a broker that keeps its topics in memory looks like)."""


def probe_topics(settings: Settings, timeout_s: float) -> None:
    """Raise unless the broker answers within ``timeout_s``; raise :class:`TopicsChanged`
    if it answers but the queries and labels topics are no longer as :func:`check_topics`
    requires (their offsets, and the co-partitioning, are gone: serving on would stall or mix
    partitions).

    It ends by then whatever the broker does. A frozen broker (SIGSTOP) accepts connections
    and never answers, and kafka-python bounds each step on its own: frozen once the probe had
    bootstrapped, the describe request waited for its new connection's setup timeout
    (``socket_connection_setup_timeout_ms``, 10 s, whatever ``request_timeout_ms``). So the
    bootstrap is cut off at the deadline (:func:`new_admin`) and the request given up then."""
    deadline = time.monotonic() + timeout_s
    timeout_ms = int(timeout_s * 1000)
    admin = new_admin(
        deadline,
        **client_options(settings),
        bootstrap_timeout_ms=timeout_ms,
        request_timeout_ms=max(timeout_ms, 1000),
    )
    try:
        topics = [settings.queries_topic, settings.labels_topic]
        counts = _described_counts(admin, topics, deadline)
    finally:
        admin.close()
    problem = topics_problem(settings, counts)
    if problem is not None:
        raise TopicsChanged(
            f"the topics changed while serving (the broker restarted without its data?); {problem}"
            ", then start serve again"
        )


_loud_level: list[int] = []  # the "kafka" logger's level while quieted, to restore


def quiet_kafka_logs(quiet: bool) -> None:
    """Silence kafka-python's own log lines (one per failed reconnection attempt), or give
    them back their level (idempotent both ways)."""
    kafka_log = logging.getLogger("kafka")
    if quiet and not _loud_level:
        _loud_level.append(kafka_log.level)
        kafka_log.setLevel(logging.CRITICAL)
    elif not quiet and _loud_level:
        kafka_log.setLevel(_loud_level.pop())


#: How long a command waits for the Kafka broker to answer before it says it cannot reach it.
BROKER_TIMEOUT_S = 10.0


class BrokerUnreachable(RuntimeError):
    """No broker of ``METALLM_KAFKA_BOOTSTRAP`` answered in time."""


def check_broker(settings: Settings, timeout_s: float = BROKER_TIMEOUT_S) -> None:
    """Raise :class:`BrokerUnreachable` unless a bootstrap server answers within ``timeout_s``
    (a command then fails at once, naming the servers, instead of retrying for ever)."""
    from kafka.errors import KafkaError

    timeout_ms = int(timeout_s * 1000)
    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)  # each failed attempt is logged: the error says it all
    try:
        admin = new_admin(
            time.monotonic() + timeout_s,
            **client_options(settings),
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=max(timeout_ms, 1000),
        )
    except (KafkaError, OSError) as exc:
        raise BrokerUnreachable(
            f"cannot reach the Kafka broker at {settings.kafka_bootstrap} within {timeout_s:g} s "
            f"({type(exc).__name__}); start one (`metallm broker`) or set "
            "METALLM_KAFKA_BOOTSTRAP"
        ) from None
    finally:
        kafka_log.setLevel(level)
    admin.close()
