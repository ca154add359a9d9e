"""The Kafka publisher (confluent-kafka): idempotent, with delivery reports and back-pressure."""

from __future__ import annotations

import logging
import re
import threading
import time

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from abflow.core.errors import AbflowError
from abflow.settings import Topics
from producers.contracts import CONVERSION, INVOCATION, Event, encode


class PublishError(AbflowError):
    """Some records could not be delivered."""


class _Repeats(logging.Filter):
    """Lets a message through once a minute: librdkafka retries a refused connection every 50 ms and
    logs each try."""

    def __init__(self, every: float = 60.0):
        super().__init__()
        self.every = every
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = re.sub(r"\d+ms", "", record.getMessage())
        now = time.monotonic()
        if now - self._last.get(key, -self.every) < self.every:
            return False
        self._last[key] = now
        return True


# librdkafka's own log, through Python's logging, each repeated message once a minute.
KAFKA_LOG = logging.getLogger("abflow.kafka")
KAFKA_LOG.addFilter(_Repeats())


class Publisher:
    """Publishes events keyed by user id; nothing is dropped silently.

    ``produce`` blocks (serving delivery reports) while the local queue is
    full instead of dropping; ``flush`` waits for every delivery and raises
    ``PublishError`` if any record failed since the last flush.
    """

    def __init__(self, bootstrap: str, topics: Topics | None = None, config: dict | None = None,
                 connect_timeout: float = 10.0):
        """Fails within ``connect_timeout`` seconds, with ``PublishError``, when no broker at
        ``bootstrap`` answers (rather than queueing records that can never be delivered)."""
        self.topics = topics or Topics()
        conf = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,  # acks=all, retries without duplicates or reordering
            "linger.ms": 5,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 200_000,
            "message.timeout.ms": 60_000,
            "log.connection.close": False,  # idle connections closed by the broker are not news
            "logger": KAFKA_LOG,
        }
        conf.update(config or {})
        self._producer = Producer(conf)
        try:
            self._producer.list_topics(timeout=connect_timeout)
        except KafkaException as exc:
            self._producer = None
            raise PublishError(f"no Kafka broker answered at {bootstrap} within {connect_timeout:g} s ({exc.args[0]}); "
                               "check the bootstrap servers (ABFLOW_KAFKA_BOOTSTRAP) and that the broker runs") from None
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0
        self._errors: list[str] = []

    def _on_delivery(self, err: KafkaError | None, msg) -> None:
        if err is None:
            self.delivered += 1
            return
        with self._lock:
            self.failed += 1
            if len(self._errors) < 10:
                self._errors.append(f"{msg.topic()}: {err}")

    def produce(self, topic: str, value: bytes, key: bytes | str | None = None, headers=None) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery)
                break
            except BufferError:
                # Back-pressure: the local queue is full, wait for deliveries to drain it.
                self._producer.poll(0.05)
        self._producer.poll(0)

    def publish(self, event: Event) -> None:
        topic = {INVOCATION: self.topics.invocations, CONVERSION: self.topics.conversions}.get(event.kind,
                                                                                              self.topics.shadows)
        self.produce(topic, encode(event), key=event.user_id)

    def broker_problem(self, timeout: float = 0.5) -> str | None:
        """None when a broker answers a metadata request within ``timeout`` seconds, else what went wrong."""
        try:
            self._producer.list_topics(timeout=timeout)
        except KafkaException as exc:
            return str(exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else exc)
        return None

    def poll(self, timeout: float = 0) -> int:
        return self._producer.poll(timeout)

    def flush(self, timeout: float = 60.0) -> None:
        remaining = self._producer.flush(timeout)
        with self._lock:
            errors, self._errors = self._errors, []
        if remaining:
            raise PublishError(f"{remaining} records still undelivered after {timeout:.0f}s")
        if errors:
            raise PublishError("delivery failed: " + "; ".join(errors))

    def close(self) -> None:
        if self._producer is None:
            return
        try:
            self.flush()
        finally:
            self._producer = None  # librdkafka's handle goes with it

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ensure_topics(bootstrap: str, topics: Topics, partitions: int, timeout: float = 30.0) -> None:
    """Create abflow's topics when they are missing (the allocations topic compacted)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log.connection.close": False})
    deadline = time.monotonic() + timeout
    while True:
        try:
            existing = set(admin.list_topics(timeout=5).topics)
            break
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    wanted = [
        NewTopic(topics.invocations, partitions, 1),
        NewTopic(topics.conversions, partitions, 1),
        NewTopic(topics.dead_letters, partitions, 1),
        NewTopic(topics.shadows, partitions, 1),
        NewTopic(topics.allocations, 1, 1, config={"cleanup.policy": "compact"}),
    ]
    missing = [t for t in wanted if t.topic not in existing]
    if not missing:
        return
    for future in admin.create_topics(missing, operation_timeout=timeout).values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def topic_ids(bootstrap: str, names: list[str], timeout: float = 10.0) -> dict[str, str]:
    """Each topic's id: it changes when a topic is deleted and created again."""
    from confluent_kafka import TopicCollection

    admin = AdminClient({"bootstrap.servers": bootstrap, "log.connection.close": False})
    futures = admin.describe_topics(TopicCollection(names), request_timeout=timeout)
    return {name: str(future.result().topic_id) for name, future in futures.items()}


def log_start_offsets(bootstrap: str, partitions: list[tuple[str, int]], timeout: float = 10.0
                      ) -> dict[tuple[str, int], int]:
    """Each partition's log start offset: the first offset the broker still keeps (retention moves it)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log.connection.close": False})
    futures = admin.list_offsets({TopicPartition(topic, partition): OffsetSpec.earliest()
                                  for topic, partition in partitions}, request_timeout=timeout)
    return {(tp.topic, tp.partition): future.result().offset for tp, future in futures.items()}
