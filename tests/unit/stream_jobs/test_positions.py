"""Holes in what the consumer reads: read again when withheld, passed when deleted or when they stay
(no broker needed)."""

from __future__ import annotations

from producers.contracts import INVOCATION
from stream_jobs.positions import ReadPositions
from stream_jobs.records import Record

TOPIC = "abflow.invocations"


def read(*offsets: int, partition: int = 0) -> list[Record]:
    return [Record(TOPIC, partition, offset, INVOCATION, b"u", b"{}") for offset in offsets]


def offsets(records: list[Record]) -> list[tuple[int, int]]:
    return [(r.partition, r.offset) for r in records]


def test_dense_reading_is_delivered_whole_across_batches_and_partitions():
    positions = ReadPositions()
    first = positions.check(read(0, 1, 2) + read(7, 8, partition=1))  # where a partition starts is not a hole
    second = positions.check(read(3, 4) + read(9, partition=1))
    assert offsets(first.deliver) == [(0, 0), (0, 1), (0, 2), (1, 7), (1, 8)]
    assert offsets(second.deliver) == [(0, 3), (0, 4), (1, 9)]
    assert not (first.reread or second.reread or first.passed or second.passed)


def test_a_hole_is_read_again_and_what_followed_it_is_held_back_until_the_reread_fills_it():
    positions = ReadPositions()
    positions.check(read(0, 1, 2))
    jumped = positions.check(read(3, 6, 7) + read(0, 1, partition=1))
    assert jumped.reread == {(TOPIC, 0): (4, 6)}
    assert offsets(jumped.deliver) == [(0, 3), (1, 0), (1, 1)]  # up to the hole, and the other partition
    again = positions.check(read(4, 5, 6, 7, 8))
    assert again.filled == {(TOPIC, 0): 4}
    assert offsets(again.deliver) == [(0, 4), (0, 5), (0, 6), (0, 7), (0, 8)]
    assert not again.reread and not again.passed


def test_a_hole_that_stays_is_passed_after_the_rereads_and_only_then():
    positions = ReadPositions(max_rereads=2)
    positions.check(read(0, 1))
    delivered = []
    for _ in range(2):
        checked = positions.check(read(5, 6))
        assert checked.reread == {(TOPIC, 0): (2, 5)}
        delivered += checked.deliver
    assert delivered == []
    passed = positions.check(read(5, 6))
    assert passed.passed == {(TOPIC, 0): (2, 5)}
    assert offsets(passed.deliver) == [(0, 5), (0, 6)]
    # A later hole is a new one: read again before it is passed.
    assert positions.check(read(9)).reread == {(TOPIC, 0): (7, 9)}


def test_records_read_again_below_the_position_are_delivered_and_reading_goes_on_from_there():
    positions = ReadPositions()
    positions.check(read(10, 11))
    reset = positions.check(read(0, 1))  # the consumer was reset to the earliest offset: the sink skips these
    assert offsets(reset.deliver) == [(0, 0), (0, 1)] and not reset.reread
    assert positions.check(read(2)).reread == {}


def test_forgotten_partitions_start_again_wherever_they_are_read():
    positions = ReadPositions()
    positions.check(read(0, 1) + read(0, partition=1))
    positions.forget([(TOPIC, 0)])  # revoked, then assigned again
    checked = positions.check(read(40) + read(5, partition=1))
    assert offsets(checked.deliver) == [(0, 40)]
    assert checked.reread == {(TOPIC, 1): (1, 5)}


def test_a_hole_below_the_log_start_was_deleted_and_is_not_read_again():
    """Retention moved the log start past the position (the consumer was reset to the new start):
    the records are gone, reading again cannot find them."""
    positions = ReadPositions()
    positions.check(read(0, 1, 2))
    asked: list = []

    def log_start(tp):
        asked.append(tp)
        return 50

    checked = positions.check(read(50, 51), log_start=log_start)
    assert checked.deleted == {(TOPIC, 0): (3, 50)}
    assert offsets(checked.deliver) == [(0, 50), (0, 51)]
    assert not checked.reread and not checked.passed
    assert asked == [(TOPIC, 0)]
    positions.check(read(52, 53), log_start=log_start)
    assert asked == [(TOPIC, 0)]  # asked for holes only


def test_a_hole_partly_below_the_log_start_is_read_again_from_the_log_start():
    positions = ReadPositions()
    positions.check(read(0, 1, 2))
    checked = positions.check(read(60, 61), log_start=lambda _: 50)
    assert checked.reread == {(TOPIC, 0): (50, 60)}  # 50-59 are kept by the broker: withheld
    again = positions.check(read(50, 51), log_start=lambda _: 50)
    assert offsets(again.deliver) == [(0, 50), (0, 51)]
    assert again.deleted == {(TOPIC, 0): (3, 50)} and not again.reread
