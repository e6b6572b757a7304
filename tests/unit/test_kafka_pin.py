"""The rebalance hooks resume on the consumer's IO loop through kafka-python 3.0's private
``KafkaConsumer._net``, and a consumer leaving its group on stop first sends a heartbeat through
its private ``_coordinator`` (no public API does either); pyproject.toml pins kafka-python to
3.0 for them. These tests fail on a kafka-python without them, before any rebalance could."""

from __future__ import annotations

import threading
import time

import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.errors import KafkaError
from kafka.net.manager import KafkaConnectionManager

from consumers.kafka_io import new_admin
from consumers.rebalance import heartbeat_sender, io_loop


def test_the_pinned_kafka_python_has_the_io_loop_and_heartbeat_the_consumers_use():
    # api_version given: no broker is asked (none listens on port 1)
    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:1", api_version=(3, 9))
    try:
        assert callable(io_loop(consumer).call_soon_threadsafe)
        manager, send = heartbeat_sender(consumer)
        assert callable(manager.call_soon) and callable(manager.wait_for) and callable(send)
    finally:
        consumer.close()


def test_a_client_without_them_is_refused_with_what_to_do():
    with pytest.raises(RuntimeError, match="install the version pyproject.toml pins"):
        io_loop(object())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="install the version pyproject.toml pins"):
        heartbeat_sender(object())  # type: ignore[arg-type]


def test_a_probe_that_fails_stops_the_io_thread_its_admin_client_started():
    """``new_admin`` reaches kafka-python's ``KafkaNetClient`` and its ``_net`` to stop the IO
    thread a failed ``KafkaAdminClient`` constructor leaves running."""

    def io_threads() -> int:
        return sum(t.name.startswith("kafka-io") for t in threading.enumerate())

    before = io_threads()
    with pytest.raises(KafkaError):  # nothing listens on port 1
        new_admin(bootstrap_servers="127.0.0.1:1", bootstrap_timeout_ms=200)
    assert io_threads() == before


def test_the_pinned_kafka_python_has_what_the_probes_deadline_uses():
    """``new_admin(deadline)`` schedules its cut-off on kafka-python's private IO loop
    (``KafkaNetClient._net.call_at``, the manager's ``_conns``) and ``probe_topics`` awaits the
    describe request on it (``KafkaAdminClient._manager``, ``_get_cluster_metadata``): a
    kafka-python without them fails here, not as a probe that always raises."""
    with pytest.raises(KafkaError):  # not AttributeError: the hook reached what it needs
        new_admin(time.monotonic() + 0.2, bootstrap_servers="127.0.0.1:1", bootstrap_timeout_ms=200)
    assert callable(KafkaAdminClient._get_cluster_metadata)
    for name in ("call_soon", "run", "wait_for"):
        assert callable(getattr(KafkaConnectionManager, name))
