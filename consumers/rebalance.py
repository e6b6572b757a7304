"""The consumers' group membership: the rebalance listener that finishes a consumer's work
before its partitions move (:class:`Rebalance`), and, on stop, whether the group is
rebalancing before the consumer leaves it (:func:`group_rebalancing`).

Both reach into kafka-python 3.0's private parts, which no public API replaces: the consumer's
IO loop (``KafkaConsumer._net``) and its group coordinator's heartbeat
(``KafkaConsumer._coordinator``). pyproject.toml pins kafka-python to 3.0, and
:class:`consumers.batch.BatchConsumer` checks both when it is built, not at the first
rebalance or stop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import RebalanceInProgressError
from kafka.future import Future as KafkaFuture

log = logging.getLogger(__name__)


class Member(Protocol):
    """What the listener needs of its consumer (:class:`consumers.batch.BatchConsumer`)."""

    name: str
    consumer: KafkaConsumer
    rebalancing: bool

    def revoking(self, revoked: set[TopicPartition]) -> None: ...

    def lost(self, partitions: set[TopicPartition]) -> None: ...


def io_loop(consumer: KafkaConsumer) -> Any:
    """The consumer's IO loop, on which a rebalance hook resumes once its work (on another
    thread) is done. kafka-python 3.0 offers no public way to schedule work on it from another
    thread (a :class:`KafkaFuture` resolved there would wake the hook without waking the loop):
    this reads its private ``_net``, so kafka-python is pinned to 3.0 (pyproject.toml) and this
    raises at start, not at the first rebalance, if another version dropped it."""
    net = getattr(consumer, "_net", None)
    if not callable(getattr(net, "call_soon_threadsafe", None)):
        raise RuntimeError(
            "this kafka-python has no KafkaConsumer._net.call_soon_threadsafe, which the "
            "rebalance hooks need: install the version pyproject.toml pins (3.0)"
        )
    return net


class Rebalance(AsyncConsumerRebalanceListener):
    """Tells a :class:`~consumers.batch.BatchConsumer` of its group's rebalances.

    kafka-python runs these hooks on the consumer's IO thread (the one that sends heartbeats),
    while the consumer's own thread waits in ``poll``; a hook there may not block on the
    consumer (a commit would deadlock). So the owner's work runs on a thread of its own and
    the hook awaits it, the IO loop going on meanwhile: the partitions move only once the
    batches held have been stored and committed."""

    def __init__(self, owner: Member) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.owner.rebalancing = True
        await self._off_the_loop(self.owner.revoking, set(revoked))

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        await self._off_the_loop(self.owner.lost, set(lost))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.owner.rebalancing = False
        if assigned:
            names = ", ".join(f"{t.topic}[{t.partition}]" for t in sorted(assigned))
            log.info("%s: assigned %s", self.owner.name, names)

    async def _off_the_loop(self, work: Callable[[set[TopicPartition]], None], arg) -> None:
        done: KafkaFuture = KafkaFuture()
        net = io_loop(self.owner.consumer)

        def run() -> None:
            try:
                work(arg)
                failure = None
            except BaseException as exc:
                failure = exc

            async def resolve() -> None:
                if failure is None:
                    done.success(None)
                else:
                    done.failure(failure)

            net.call_soon_threadsafe(resolve)

        threading.Thread(target=run, name=f"metallm-{self.owner.name}-rebalance").start()
        await done


def heartbeat_sender(consumer: KafkaConsumer) -> tuple[Any, Callable[[], Any]]:
    """The consumer's network manager and its coordinator's coroutine that sends one heartbeat
    (kafka-python 3.0's private ``_coordinator``; see :func:`io_loop`); raises if missing."""
    coordinator = getattr(consumer, "_coordinator", None)
    manager = getattr(coordinator, "_manager", None)
    send = getattr(coordinator, "_send_heartbeat_request", None)
    if manager is None or not callable(send):
        raise RuntimeError(
            "this kafka-python has no KafkaConsumer._coordinator._send_heartbeat_request, "
            "which leaving a group needs: install the version pyproject.toml pins (3.0)"
        )
    return manager, send


def group_rebalancing(consumer: KafkaConsumer, timeout_s: float) -> bool:
    """Whether the consumer's group is rebalancing now, as a heartbeat sent now is answered
    (a member may have joined since the consumer's last heartbeat, which would have told it
    within ``heartbeat_interval_ms``). That answer also makes its next poll rejoin the group.
    False when it cannot tell within ``timeout_s`` (no coordinator known, broker away, not a
    member): leaving is then all that can be done."""
    manager, send = heartbeat_sender(consumer)
    try:
        io_loop(consumer).run(manager.wait_for, manager.call_soon(send), timeout_s * 1000)
    except RebalanceInProgressError:
        return True
    except Exception:
        log.debug("a heartbeat before leaving the group failed", exc_info=True)
    return False
