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
from collections import deque

import numpy as np
import psycopg

from storage import sink as store

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
PRUNE_EVERY_SECONDS = 60.0
MINUTE_SECONDS = 60.0
DIGEST = np.dtype("S16")


def _digest(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode(), digest_size=16).digest()


class PartitionDedup:
    """The event ids one partition counted within the dedup horizon.

    Kept as 16-byte digests (blake2b): about 20 bytes an id where a string in a set took about
    127 (measured on a million ids), so a worker's memory does not grow by hundreds of MB with the
    horizon at thousands of events/s. Two different ids share a digest with a chance of n / 2^128 (n: the ids held; at
    5,000 events/s for 15 minutes, 1e-32 for each new id). The ids of the current minute are a
    set; each earlier minute is one sorted array, forgotten whole once its newest batch is past
    the horizon (an id is remembered up to a minute longer than the horizon: a duplicate is
    still one)."""

    def __init__(self) -> None:
        self._minutes: deque[tuple[float, np.ndarray]] = deque()  # (newest batch time, sorted digests)
        self._new_minute()

    def _new_minute(self) -> None:
        self._current: set[bytes] = set()
        self._current_started: float | None = None  # time of the current minute's first batch
        self._current_newest = 0.0

    def add(self, at: float, event_ids: list[str]) -> None:
        if not event_ids:
            return
        if self._current_started is not None and at - self._current_started >= MINUTE_SECONDS:
            self._freeze()
        if self._current_started is None:
            self._current_started = at
        self._current.update(map(_digest, event_ids))
        self._current_newest = max(self._current_newest, at)

    def _freeze(self) -> None:
        if self._current:
            self._minutes.append((self._current_newest, np.sort(np.array(list(self._current), dtype=DIGEST))))
        self._new_minute()

    def expire(self, older_than: float) -> None:
        while self._minutes and self._minutes[0][0] < older_than:
            self._minutes.popleft()
        if self._current_started is not None and self._current_newest < older_than:
            self._new_minute()

    def seen_among(self, event_ids: list[str]) -> set[str]:
        """Those of ``event_ids`` this partition counted within the horizon."""
        digests = [_digest(event_id) for event_id in event_ids]
        seen = {event_id for event_id, digest in zip(event_ids, digests) if digest in self._current}
        if self._minutes and digests:
            probe = np.array(digests, dtype=DIGEST)
            hit = np.zeros(len(probe), dtype=bool)
            for _, minute in self._minutes:
                at = np.minimum(np.searchsorted(minute, probe), len(minute) - 1)
                hit |= minute[at] == probe
            seen.update(event_id for event_id, found in zip(event_ids, hit.tolist()) if found)
        return seen

    def __len__(self) -> int:
        return len(self._current) + sum(len(minute) for _, minute in self._minutes)


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
