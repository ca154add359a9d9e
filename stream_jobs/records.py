"""One Kafka record as the worker hands it from the consumer to the sink."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Record:
    """One Kafka record as the sink sees it."""

    topic: str
    partition: int
    offset: int
    kind: str  # INVOCATION, CONVERSION or SHADOW
    key: bytes | None
    value: bytes | None
