"""Where each partition stands: its stored next offset and the event ids it counted recently.

The offsets stored in PostgreSQL, beside the aggregates, decide what counts;
Kafka's committed offsets only say where to resume reading. ``Checkpoints``
locks a batch's partitions, notices a recreated topic (a new topic id: the
embedded broker forgets its logs on restart) and keeps a cache of each
partition's counted ids within the dedup horizon, reloaded from PostgreSQL
whenever the stored offset is not the one this worker wrote last (someone else
wrote in between).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import psycopg

from storage import sink as store

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
PRUNE_EVERY_SECONDS = 60.0
MINUTE_SECONDS = 60.0
RECENT_MAX_IDS = 16_384


def _digest(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode(), digest_size=16).digest()


class Digests:
    """Digests sorted by their first 64-bit half, held as two arrays of halves: a search compares
    native integers, where numpy compares 16-byte strings about ten times slower. Two digests that
    share a first half (a chance of 2^-64 a pair) are told apart by looking at each."""

    def __init__(self, first: np.ndarray, second: np.ndarray):
        self.first, self.second = first, second

    @classmethod
    def of(cls, digests: list[bytes]) -> "Digests":
        halves = np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2)
        order = np.argsort(halves[:, 0], kind="stable")
        return cls(halves[order, 0], halves[order, 1])

    def __len__(self) -> int:
        return len(self.first)

    def contains(self, probe: "Digests") -> np.ndarray:
        """For each digest of ``probe`` (sorted, so that each search starts where the last ended),
        whether it is here."""
        if not len(self.first):
            return np.zeros(len(probe), dtype=bool)
        at = np.minimum(np.searchsorted(self.first, probe.first), len(self.first) - 1)
        first_equal = self.first[at] == probe.first
        found = first_equal & (self.second[at] == probe.second)
        # A digest whose first half is shared may sit after the first one with that half.
        for i in np.flatnonzero(first_equal & ~found):
            run = slice(at[i], np.searchsorted(self.first, probe.first[i], "right"))
            found[i] = bool((self.second[run] == probe.second[i]).any())
        return found


class PartitionDedup:
    """The event ids one partition counted within the dedup horizon.

    Kept as 16-byte digests (blake2b) in one sorted array, each with the number of the minute it
    was counted in (a few bytes more an id; a string in a set costs several times that), and a
    batch's ids are looked up with one search of the whole horizon rather than one per minute
    (``bench/dedup.py``; README, Dedup in steady state). Two different ids share a digest with a
    chance of n / 2^128 (n: the ids held; at 5,000 events/s for 15 minutes, 1e-32 for each new
    id). A minute's ids are forgotten together once its newest batch is past the horizon (an id is
    remembered up to a minute longer than the horizon: a duplicate is still one). The newest ids
    wait in a set, which costs several times the array's bytes a digest, until RECENT_MAX_IDS of
    them or the end of their minute move them into the array: a worker catching up counts far
    more than a minute's worth of ids a minute."""

    def __init__(self) -> None:
        self._held = Digests(np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64))
        self._minute_of = np.empty(0, dtype=np.uint32)  # per held digest, the number of its minute
        self._newest: dict[int, float] = {}  # per minute number, the time of its newest batch
        self._recent: set[bytes] = set()  # the newest ids, of the current minute
        self._minute = -1  # the current minute's number; -1 before the first batch
        self._minute_started = 0.0  # time of the current minute's first batch

    def add(self, at: float, event_ids: list[str]) -> None:
        if not event_ids:
            return
        if self._minute < 0 or at - self._minute_started >= MINUTE_SECONDS:
            self._hold_recent()
            self._minute += 1
            self._minute_started = at
        self._recent.update(map(_digest, event_ids))
        self._newest[self._minute] = max(self._newest.get(self._minute, at), at)
        if len(self._recent) >= RECENT_MAX_IDS:
            self._hold_recent()

    def _hold_recent(self) -> None:
        """Move the recent ids (all of the current minute) into the sorted array."""
        if not self._recent:
            return
        recent = Digests.of(list(self._recent))
        at = np.searchsorted(self._held.first, recent.first)
        self._held = Digests(np.insert(self._held.first, at, recent.first),
                             np.insert(self._held.second, at, recent.second))
        self._minute_of = np.insert(self._minute_of, at, np.uint32(self._minute))
        self._recent = set()

    def expire(self, older_than: float) -> None:
        gone = [minute for minute, newest in self._newest.items() if newest < older_than]
        if not gone:
            return
        for minute in gone:
            del self._newest[minute]
        if self._minute in gone:
            self._recent = set()
        keep = ~np.isin(self._minute_of, gone)
        self._held = Digests(self._held.first[keep], self._held.second[keep])
        self._minute_of = self._minute_of[keep]

    def seen_among(self, event_ids: list[str]) -> set[str]:
        """Those of ``event_ids`` this partition counted within the horizon."""
        digests = [_digest(event_id) for event_id in event_ids]
        seen = {event_id for event_id, digest in zip(event_ids, digests) if digest in self._recent}
        if len(self._held) and digests:
            probe = Digests.of(digests)
            hit = self._held.contains(probe)
            held = {first.tobytes() + second.tobytes() for first, second in zip(probe.first[hit], probe.second[hit])}
            seen.update(event_id for event_id, digest in zip(event_ids, digests) if digest in held)
        return seen

    def __len__(self) -> int:
        return len(self._recent) + len(self._held)


class TopicIds:
    """Topic ids from the broker, cached; ``fresh=True`` asks again."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self._ids: dict[str, str] = {}

    def get(self, topics: set[str], fresh: bool = False) -> dict[str, str]:
        missing = [t for t in topics if fresh or t not in self._ids]
        if missing:
            from producers.publisher import topic_ids

            self._ids.update(topic_ids(self.bootstrap, missing))
        return {t: self._ids[t] for t in topics}


class Checkpoints:
    def __init__(self, topic_ids: TopicIds, horizon_seconds: float):
        self.topic_ids = topic_ids
        self.horizon = horizon_seconds
        self._expected_next: dict[TopicPartition, int] = {}
        self._dedup: dict[TopicPartition, PartitionDedup] = {}
        self._pruned_at: dict[TopicPartition, float] = {}

    def begin(self, conn: psycopg.Connection, lowest: dict[TopicPartition, int], now: float
              ) -> tuple[dict[TopicPartition, int], dict[str, str]]:
        """Lock the partitions of a batch (``lowest``: its first offset in each); returns each partition's
        next offset to apply and the topics' ids. Runs inside the batch's transaction."""
        partitions = sorted(lowest)
        topics = {t for t, _ in partitions}
        ids = self.topic_ids.get(topics)
        stored = store.lock_offsets(conn, partitions, ids)
        if any(lowest[tp] < stored[tp][1] or stored[tp][0] != ids[tp[0]] for tp in partitions):
            # About to skip records as already applied, or the topic looks recreated:
            # make sure the topic id is current before trusting the stored offsets.
            ids = self.topic_ids.get(topics, fresh=True)
        next_offsets: dict[TopicPartition, int] = {}
        for tp in partitions:
            topic_id, offset = stored[tp]
            if topic_id != ids[tp[0]]:
                log.warning("topic %s was recreated (id %s -> %s): offsets of partition %d start again at 0",
                            tp[0], topic_id, ids[tp[0]], tp[1])
                offset = 0
            next_offsets[tp] = offset
            if self._expected_next.get(tp) != offset or tp not in self._dedup:
                self._reload(conn, tp, now)
        return next_offsets, ids

    def seen_among(self, event_ids: dict[TopicPartition, list[str]]) -> dict[TopicPartition, set[str]]:
        """Per partition (locked by ``begin``), those of its ``event_ids`` it counted within the horizon."""
        return {tp: self._dedup[tp].seen_among(ids) for tp, ids in event_ids.items()}

    def write(self, conn: psycopg.Connection, next_offsets: dict[TopicPartition, int], ids: dict[str, str],
              new_ids: dict[TopicPartition, list[str]], now: float) -> None:
        """Store the offsets and the newly counted ids in the batch's transaction (and prune old ids)."""
        store.add_dedup_ids(conn, now, new_ids)
        store.store_offsets(conn, next_offsets, ids)
        due = self._prune_due(next_offsets, now)
        if due:
            store.prune_dedup_ids(conn, due, now - self.horizon - PRUNE_EVERY_SECONDS)

    def _prune_due(self, partitions, now: float) -> list[TopicPartition]:
        return [tp for tp in partitions if now - self._pruned_at.get(tp, 0.0) > PRUNE_EVERY_SECONDS]

    def committed(self, next_offsets: dict[TopicPartition, int], new_ids: dict[TopicPartition, list[str]],
                  now: float) -> None:
        """The batch committed: now the cache may believe it."""
        for tp in self._prune_due(next_offsets, now):
            self._pruned_at[tp] = now
        for tp, offset in next_offsets.items():
            self._expected_next[tp] = offset
            dedup = self._dedup[tp]
            dedup.add(now, new_ids.get(tp, []))
            dedup.expire(now - self.horizon)

    def forget(self) -> None:
        """The batch rolled back: believe nothing about the partitions until they are read again."""
        self._expected_next.clear()

    def _reload(self, conn: psycopg.Connection, tp: TopicPartition, now: float) -> None:
        dedup = PartitionDedup()
        for created_at, event_ids in store.dedup_ids_since(conn, tp, now - self.horizon):
            dedup.add(created_at, event_ids)
        self._dedup[tp] = dedup
