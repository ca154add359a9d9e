"""Where records that cannot be counted go: the dead-letter topic, with the reason and the original bytes."""

from __future__ import annotations

from typing import Protocol

from producers.contracts import InvalidEvent
from producers.publisher import Publisher
from stream_jobs.aggregate import Record


class DeadLetters(Protocol):
    def publish(self, rejected: list[tuple[Record, InvalidEvent]]) -> None:
        """Deliver every rejected record before returning (the sink commits its offsets afterwards)."""


class KafkaDeadLetters:
    """Publishes to ``topic``: value = the original bytes, key = the original key, and headers
    ``abflow.reason``, ``abflow.detail``, ``abflow.source.topic|partition|offset``."""

    def __init__(self, publisher: Publisher, topic: str, flush_seconds: float = 30.0):
        self.publisher = publisher
        self.topic = topic
        self.flush_seconds = flush_seconds

    def publish(self, rejected: list[tuple[Record, InvalidEvent]]) -> None:
        for record, error in rejected:
            headers = [
                ("abflow.reason", error.reason.encode()),
                ("abflow.detail", error.detail.encode("utf-8", "replace")),
                ("abflow.source.topic", record.topic.encode()),
                ("abflow.source.partition", str(record.partition).encode()),
                ("abflow.source.offset", str(record.offset).encode()),
            ]
            self.publisher.produce(self.topic, value=record.value, key=record.key, headers=headers)
        # Delivered before the offsets move past them: a crash replays them (at least once).
        self.publisher.flush(self.flush_seconds)

    def close(self) -> None:
        self.publisher.close()
