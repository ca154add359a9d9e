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

import logging

import psycopg

from storage import sink as store
from stream_jobs.dedup import PartitionDedup

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
PRUNE_EVERY_SECONDS = 60.0


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
