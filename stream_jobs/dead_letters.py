"""Where records that cannot be counted go: the dead-letter topic, with the reason and the original bytes."""

from __future__ import annotations

import hashlib
from typing import Protocol

from producers.contracts import InvalidEvent
from producers.publisher import Publisher
from stream_jobs.records import Record

DETAIL_MAX_CHARS = 1000  # a database error can be long; the reason code says what kind it is


class DeadLetters(Protocol):
    def publish(self, rejected: list[tuple[Record, InvalidEvent]]) -> None:
        """Deliver every rejected record before returning (the sink commits its offsets afterwards)."""


def truncated(data: bytes | None, max_bytes: int, prefix: str = "abflow.original"
              ) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """``data`` cut to ``max_bytes``, with the headers that say so: its original size and SHA-256.

    A dead letter must never fail for its size (a record over the producer's limit would be
    retried forever and stop the worker), so it keeps the first ``max_bytes`` only."""
    if data is None or len(data) <= max_bytes:
        return data, []
    return data[:max_bytes], [(f"{prefix}.bytes", str(len(data)).encode()),
                              (f"{prefix}.sha256", hashlib.sha256(data).hexdigest().encode())]


class KafkaDeadLetters:
    """Publishes to ``topic``: value = the original bytes, key = the original key, and headers
    ``abflow.reason``, ``abflow.detail``, ``abflow.source.topic|partition|offset``. A value over
    ``max_value_bytes`` (a key over ``max_key_bytes``) keeps its first bytes, with the headers
    ``abflow.original.bytes`` and ``abflow.original.sha256`` (``abflow.original.key.*`` for the key)."""

    def __init__(self, publisher: Publisher, topic: str, flush_seconds: float = 30.0,
                 max_value_bytes: int = 64 * 1024, max_key_bytes: int = 1024):
        self.publisher = publisher
        self.topic = topic
        self.flush_seconds = flush_seconds
        self.max_value_bytes = max_value_bytes
        self.max_key_bytes = max_key_bytes

    def publish(self, rejected: list[tuple[Record, InvalidEvent]]) -> None:
        for record, error in rejected:
            value, value_headers = truncated(record.value, self.max_value_bytes)
            key, key_headers = truncated(record.key, self.max_key_bytes, "abflow.original.key")
            headers = [
                ("abflow.reason", error.reason.encode()),
                ("abflow.detail", error.detail[:DETAIL_MAX_CHARS].encode("utf-8", "replace")),
                ("abflow.source.topic", record.topic.encode()),
                ("abflow.source.partition", str(record.partition).encode()),
                ("abflow.source.offset", str(record.offset).encode()),
                *value_headers,
                *key_headers,
            ]
            self.publisher.produce(self.topic, value=value, key=key, headers=headers)
        # Delivered before the offsets move past them: a crash replays them (at least once).
        self.publisher.flush(self.flush_seconds)

    def close(self) -> None:
        self.publisher.close()
