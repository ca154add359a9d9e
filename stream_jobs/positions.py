"""Holes in what the consumer reads, and reading them again. Pure: the consumer thread
(``stream_jobs.source.BatchSource``) feeds it each batch it read and seeks where it says.

A partition's offsets are dense: the record after offset n is at n + 1. A fetch answer that
jumps ahead has one of two causes, told apart by the partition's log start offset (the first
offset the broker still keeps, asked only when a hole shows):

- **Deleted**: retention (or a deletion of records) moved the log start past the position, so the
  records are gone before a worker counted them. Nothing to read again; the sink counts them as
  lost to retention (``stream_jobs.classify.split_holes``). This is how a hole looks on Apache
  Kafka, whose offsets are dense from the log start for topics without transactions or
  compaction (abflow's event topics have neither).
- **Withheld**: the records are at or above the log start but were not in the answer. Only the
  embedded broker does this (twice in a 30-minute soak: a produce moves its high watermark before
  the batch is stored, so a fetch in between skips it; the records were there when asked again).
  The consumer reads the partition again from the hole's start, holding back what came after it;
  only a hole still there after ``max_rereads`` readings is passed (and counted as a gap by the sink).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from stream_jobs.records import Record

TopicPartition = tuple[str, int]
MAX_REREADS = 3


@dataclass
class Checked:
    """One batch as read, sorted out."""

    deliver: list[Record] = field(default_factory=list)  # in the order read
    reread: dict[TopicPartition, tuple[int, int]] = field(default_factory=dict)  # holes [start, end): seek to start
    passed: dict[TopicPartition, tuple[int, int]] = field(default_factory=dict)  # holes still there: [start, end)
    filled: dict[TopicPartition, int] = field(default_factory=dict)  # a hole's start, found on a reread
    deleted: dict[TopicPartition, tuple[int, int]] = field(default_factory=dict)  # below the log start: [start, end)


def log_start_zero(tp: TopicPartition) -> int:  # noqa: ARG001 - a broker that deletes nothing
    return 0


class ReadPositions:
    """The next offset expected from each partition, and the holes being read again."""

    def __init__(self, max_rereads: int = MAX_REREADS):
        self.max_rereads = max_rereads
        self._next: dict[TopicPartition, int] = {}
        self._rereads: dict[TopicPartition, tuple[int, int]] = {}  # hole start, readings so far

    def forget(self, partitions: list[TopicPartition] | None = None) -> None:
        """Partitions assigned or revoked: where their reading resumes is not known (the first record
        read sets it). None: all of them."""
        for tp in list(self._next) if partitions is None else partitions:
            self._next.pop(tp, None)
            self._rereads.pop(tp, None)

    def check(self, records: list[Record],
              log_start: Callable[[TopicPartition], int] = log_start_zero) -> Checked:
        """Which of ``records`` (one consumer read, each partition's in offset order) to deliver,
        and which partitions to read again from where. ``log_start`` gives a partition's log start
        offset from the broker; it is called for holes only."""
        result = Checked()
        for record in records:
            tp = (record.topic, record.partition)
            if tp in result.reread:
                continue  # held back: read again after the hole
            expected = self._next.get(tp)
            reread = self._rereads.get(tp)
            if expected is not None and record.offset > expected:
                start = max(expected, log_start(tp))  # below the log start, the records are gone
                if start >= record.offset:
                    result.deleted[tp] = (expected, record.offset)
                else:
                    readings = reread[1] if reread is not None and reread[0] == start else 0
                    if readings < self.max_rereads:
                        self._rereads[tp] = (start, readings + 1)
                        result.reread[tp] = (start, record.offset)
                        continue
                    result.passed[tp] = (start, record.offset)
            elif reread is not None and record.offset == reread[0]:
                result.filled[tp] = record.offset
            if reread is not None and record.offset >= reread[0]:
                del self._rereads[tp]
            # A record below the expected offset is read again (a reset to the earliest offset): the
            # sink skips it as applied; reading goes on from there.
            self._next[tp] = record.offset + 1
            result.deliver.append(record)
        return result
