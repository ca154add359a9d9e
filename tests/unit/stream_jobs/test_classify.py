"""The sink's classification of a batch, without a database: replayed, invalid, duplicate, counted."""

from __future__ import annotations

import time

from producers.contracts import CONVERSION, INVOCATION, SHADOW, Conversion, InvalidEvent, Invocation, Shadow, encode
from stream_jobs.classify import classify, split_holes
from stream_jobs.records import Record
from stream_jobs.validate import Limits, validate

KNOWN = {"exp": frozenset({"A", "B"})}
SHADOWS = {"exp": frozenset({"S"})}
LIMITS = Limits(max_event_bytes=64 * 1024, max_lateness_seconds=3600, max_future_seconds=300)
NOW = time.time()


def record(offset: int, event, partition: int = 0, kind: str = INVOCATION) -> Record:
    value = event if isinstance(event, bytes) else encode(event)
    return Record("abflow.events", partition, offset, kind, b"u", value)


def outcomes(records: list[Record]) -> list:
    found = []
    for r in records:
        try:
            found.append(validate(r, KNOWN, NOW, LIMITS, SHADOWS))
        except InvalidEvent as exc:
            found.append(exc)
    return found


def invocation(event_id: str, variant: str = "A") -> Invocation:
    return Invocation(event_id, "exp", variant, "u", NOW - 1)


def test_each_record_lands_in_exactly_one_class():
    records = [
        record(10, invocation("old")),  # below the stored offset: applied before
        record(11, invocation("e1")),
        record(12, invocation("e1")),  # the same id again in this batch
        record(13, invocation("seen")),  # counted by an earlier batch
        record(14, b"{not json"),
        record(15, invocation("e2", variant="Z")),  # unknown variant
        record(16, Conversion("c1", "exp", "B", "u", NOW - 1), kind=CONVERSION),
        record(17, Shadow("s1", "exp", "S", "A", "u", NOW - 1), kind=SHADOW),
    ]
    batch = classify(records, outcomes(records), {("abflow.events", 0): 11}, {("abflow.events", 0): {"seen"}})
    assert batch.replayed == 1
    assert batch.duplicates == 2
    assert [e.event_id for e in batch.counted] == ["e1", "c1"]
    assert [e.event_id for e in batch.shadows] == ["s1"]
    assert [(r.offset, e.reason) for r, e in batch.rejected] == [(14, "malformed_json"), (15, "unknown_variant")]
    assert batch.new_ids == {("abflow.events", 0): ["e1", "c1", "s1"]}
    assert batch.next_offsets == {("abflow.events", 0): 18}
    assert batch.per_topic == {"abflow.events": [3, 2, 2]}
    assert batch.replayed + batch.duplicates + len(batch.counted) + len(batch.shadows) + len(batch.rejected) == 8
    assert batch.holes == {}


def test_offsets_passed_without_a_record_read_are_reported():
    """Offsets are dense: a hole after the stored offset or between two records means records the
    broker never handed over, which the batch's offsets would otherwise pass silently."""
    records = [record(12, invocation("a")), record(13, invocation("b")), record(17, invocation("c")),
               record(5, invocation("d"), partition=1)]
    batch = classify(records, outcomes(records), {("abflow.events", 0): 10, ("abflow.events", 1): 5}, {})
    assert batch.holes == {("abflow.events", 0): [(10, 12), (14, 17)]}
    assert batch.next_offsets == {("abflow.events", 0): 18, ("abflow.events", 1): 6}


def test_holes_below_the_log_start_were_deleted_and_the_others_are_missing():
    """Retention moved partition 0's log start to 13 while the worker was away: offsets 10-12 are
    gone (events lost before they were counted); 14-16 are above it, so the broker had them and
    did not give them. Partition 1's log start is past its whole hole."""
    holes = {("t", 0): [(10, 12), (12, 13), (14, 17)], ("t", 1): [(0, 40)], ("t", 2): [(5, 6)]}
    deleted, missing = split_holes(holes, {("t", 0): 13, ("t", 1): 100})
    assert deleted == {("t", 0): 3, ("t", 1): 40}
    assert missing == {("t", 0): 3, ("t", 2): 1}  # partition 2: no log start known, nothing deleted


def test_a_fully_replayed_batch_changes_nothing():
    records = [record(i, invocation(f"e{i}")) for i in range(5)]
    batch = classify(records, outcomes(records), {("abflow.events", 0): 5}, {})
    assert batch.replayed == 5 and not batch.counted and not batch.new_ids
    assert batch.next_offsets == {("abflow.events", 0): 5}  # stays where it was


def test_partitions_are_kept_apart():
    """Dedup is per partition: the same id in two partitions counts in each (the publisher keys by user,
    so a true duplicate always reaches the same partition)."""
    records = [record(0, invocation("same"), partition=0), record(0, invocation("same"), partition=1)]
    batch = classify(records, outcomes(records), {("abflow.events", 0): 0, ("abflow.events", 1): 0}, {})
    assert len(batch.counted) == 2 and batch.duplicates == 0
    assert batch.next_offsets == {("abflow.events", 0): 1, ("abflow.events", 1): 1}
