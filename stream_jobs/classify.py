"""The pure half of applying a batch: which records were applied before, which are invalid, which
are duplicates and which count. No database: the stored offsets and the counted ids come in as
arguments, so every case is testable on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from producers.contracts import SHADOW, Event, InvalidEvent
from stream_jobs.records import Record

TopicPartition = tuple[str, int]


@dataclass
class Classified:
    """One batch, sorted out."""

    replayed: int = 0  # records below a partition's stored next offset: applied before
    duplicates: int = 0  # events whose id the partition already counted
    counted: list[Event] = field(default_factory=list)  # invocations and conversions to add
    shadows: list[Event] = field(default_factory=list)  # shadow events (their own table)
    rejected: list[tuple[Record, InvalidEvent]] = field(default_factory=list)  # dead letters
    new_ids: dict[TopicPartition, list[str]] = field(default_factory=dict)  # ids counted now, per partition
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)  # after this batch
    per_topic: dict[str, list[int]] = field(default_factory=dict)  # [counted, duplicates, dead letters]
    # Offsets passed without a record read, [start, end): a partition's offsets are dense unless
    # retention deleted records before they were counted, or the broker withheld or lost them
    # (``split_holes`` tells which); either is worth an alarm.
    holes: dict[TopicPartition, list[tuple[int, int]]] = field(default_factory=dict)


def classify(records: list[Record], outcomes: list[Event | InvalidEvent], next_offsets: Mapping[TopicPartition, int],
             seen: Mapping[TopicPartition, Set[str]]) -> Classified:
    """Sort ``records`` (with their validation ``outcomes``) given each partition's stored next offset
    and the event ids it counted within the dedup horizon."""
    result = Classified(next_offsets=dict(next_offsets))
    batch_seen: dict[TopicPartition, set[str]] = {}
    for record, outcome in zip(records, outcomes):
        tp = (record.topic, record.partition)
        if record.offset < next_offsets[tp]:
            result.replayed += 1
            continue
        if record.offset > result.next_offsets[tp]:
            result.holes.setdefault(tp, []).append((result.next_offsets[tp], record.offset))
        result.next_offsets[tp] = max(result.next_offsets[tp], record.offset + 1)
        per_topic = result.per_topic.setdefault(record.topic, [0, 0, 0])
        if isinstance(outcome, InvalidEvent):
            result.rejected.append((record, outcome))
            per_topic[2] += 1
            continue
        counted_here = batch_seen.setdefault(tp, set())
        if outcome.event_id in seen.get(tp, ()) or outcome.event_id in counted_here:
            result.duplicates += 1
            per_topic[1] += 1
            continue
        counted_here.add(outcome.event_id)
        result.new_ids.setdefault(tp, []).append(outcome.event_id)
        (result.shadows if outcome.kind == SHADOW else result.counted).append(outcome)
        per_topic[0] += 1
    return result


def split_holes(holes: Mapping[TopicPartition, list[tuple[int, int]]], log_starts: Mapping[TopicPartition, int]
                ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Each partition's holes, split at its log start offset: the offsets below it were deleted
    (retention: events lost before a worker counted them), those above it are records the broker
    did not give (withheld or lost: a broker fault). Two maps of counts: deleted, missing."""
    deleted: dict[TopicPartition, int] = {}
    missing: dict[TopicPartition, int] = {}
    for tp, spans in holes.items():
        log_start = log_starts.get(tp, 0)
        for start, end in spans:
            gone = max(0, min(end, log_start) - start)
            if gone:
                deleted[tp] = deleted.get(tp, 0) + gone
            if end - start - gone:
                missing[tp] = missing.get(tp, 0) + end - start - gone
    return deleted, missing
