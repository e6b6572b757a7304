"""Which events the consumer keeps when it polls batches ahead and partitions move meanwhile.

The broker side of look-ahead runs against the real broker in tests/test_lookahead.py; a
rebalance landing between two polls of one look-ahead cannot be timed there, so this drives
``BatchConsumer.look_ahead`` with a consumer that replays polls and assignments.
"""

from __future__ import annotations

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from consumers.batch import BatchConsumer

T = "queries"


def record(partition: int, offset: int) -> ConsumerRecord:
    return ConsumerRecord(T, partition, -1, offset, 0, 0, None, b"x", [], None, 0, 1, 0)


class Replayed:
    """Polls returning the given batches in turn, each changing the assignment as given."""

    def __init__(self, polls: list[tuple[list[ConsumerRecord], set[int]]], owned: set[int]):
        self.polls, self.owned = list(polls), {TopicPartition(T, p) for p in owned}
        self.positions: dict[TopicPartition, int] = {}
        self.seeks: list[tuple[int, int]] = []

    def poll(self, timeout_ms: int) -> dict:
        if not self.polls:
            return {}
        batch, owned = self.polls.pop(0)
        self.owned = {TopicPartition(T, p) for p in owned}
        for r in batch:  # the position moves past what a poll returns
            self.positions[TopicPartition(T, r.partition)] = r.offset + 1
        return {TopicPartition(T, p): [r for r in batch if r.partition == p] for p in owned}

    def assignment(self) -> set[TopicPartition]:
        return self.owned

    def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp.partition, offset))
        self.positions[tp] = offset


class Prepared(BatchConsumer):
    lookahead = 2

    def __init__(self, consumer: Replayed) -> None:
        super().__init__(consumer, None, "dlq")  # type: ignore[arg-type]
        self.prepared: list[list[str]] = []

    def validate(self, raw):
        return raw

    def prepare(self, events):
        self.prepared.append(events)


def where(batches: list[list[ConsumerRecord]]) -> list[list[tuple[int, int]]]:
    return [[(r.partition, r.offset) for r in batch] for batch in batches]


def test_two_batches_are_polled_ahead_and_prepared_in_order():
    consumer = Prepared(
        Replayed([([record(0, 2), record(0, 3)], {0}), ([record(0, 4)], {0})], owned={0})
    )
    mine, ahead = consumer.look_ahead([record(0, 0), record(0, 1)], [])
    assert where([mine]) == [[(0, 0), (0, 1)]]
    assert where(ahead) == [[(0, 2), (0, 3)], [(0, 4)]]
    assert len(consumer.prepared) == 2


def test_a_partition_revoked_by_the_second_poll_leaves_every_batch():
    """The first poll returns events of partitions 0 and 1; the second poll's rebalance takes
    partition 1 away: its events go from the batch in hand and from the first batch ahead too,
    or they would be handled and committed by a consumer that no longer owns them."""
    polls = [
        ([record(0, 2), record(1, 2)], {0, 1}),
        ([record(0, 3)], {0}),  # partition 1 revoked in this poll
    ]
    consumer = Prepared(Replayed(polls, owned={0, 1}))
    mine, ahead = consumer.look_ahead([record(0, 1), record(1, 1)], [])
    assert where([mine]) == [[(0, 1)]]
    assert where(ahead) == [[(0, 2)], [(0, 3)]]


def test_a_partition_given_back_from_its_committed_offset_is_not_repeated():
    """A rebalance gives partition 0 back and the poll restarts at its committed offset (1),
    behind the events already held (up to 3): only what comes after them is kept."""
    polls = [([record(0, 1), record(0, 2), record(0, 3), record(0, 4)], {0})]
    consumer = Prepared(Replayed(polls, owned={0}))
    mine, ahead = consumer.look_ahead([record(0, 2)], [[record(0, 3)]])
    assert where([mine]) == [[(0, 2)]]
    assert where(ahead) == [[(0, 3)], [(0, 4)]]
    assert consumer.consumer.seeks == []  # its position (5) is past them already


def test_a_partition_given_back_behind_the_events_held_resumes_after_them():
    """The poll after a rebalance returns only events already held (1, 2 of up to 3): the
    partition is sought past them, or the next poll would hand the held event 3 out again."""
    consumer = Prepared(Replayed([([record(0, 1), record(0, 2)], {0})], owned={0}))
    mine, ahead = consumer.look_ahead([record(0, 2)], [[record(0, 3)]])
    assert where([mine]) == [[(0, 2)]]
    assert where(ahead) == [[(0, 3)]]
    assert consumer.consumer.seeks == [(0, 4)]


def test_nothing_is_polled_while_enough_batches_are_held():
    consumer = Prepared(Replayed([([record(0, 9)], {0})], owned={0}))
    mine, ahead = consumer.look_ahead([record(0, 1)], [[record(0, 2)], [record(0, 3)]])
    assert where(ahead) == [[(0, 2)], [(0, 3)]]
    assert consumer.consumer.polls  # not polled
