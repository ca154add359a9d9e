"""The serving SDK: assign users in-process from cached weights, and log what was served.

    client = ServingClient("kafka:9092")           # follows the compacted abflow.allocations topic
    served = client.assign("demo", user_id)        # no network call: cached weights + salted hash
    prediction = models[served.variant].predict(x)
    client.invocation(served, latency_ms=12.5)     # propensity logged with it
    client.conversion(served, reward=1.0)          # when the user converts

Assignment is the same salted-hash rule as the API's (``bandit_service.assignment``):
every process with the same weights gives a user the same variant. A user's
first variant is kept in a bounded in-process cache, so the user stays on it
in this process when the weights move (unless its weight falls to zero); for stickiness across processes and
restarts use the API's ``POST /experiments/{id}/assign``, which stores it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition

from abflow.settings import Topics
from bandit_service.assignment import DEFAULT_SALT, choose, hash_point
from producers.contracts import Conversion, Invocation
from producers.publisher import Publisher


@dataclass(frozen=True)
class Served:
    experiment_id: str
    user_id: str
    variant: str
    propensity: float
    version: int
    invocation_id: str


class UnknownExperiment(LookupError):
    pass


class ServingClient:
    def __init__(self, bootstrap: str, topics: Topics | None = None, salt: str = DEFAULT_SALT,
                 sticky_capacity: int = 1_000_000, publisher: Publisher | None = None):
        self.topics = topics or Topics()
        self.salt = salt
        self.publisher = publisher or Publisher(bootstrap, self.topics)
        self._weights: dict[str, tuple[int, dict[str, float]]] = {}
        self._sticky: OrderedDict[tuple[str, str], Served] = OrderedDict()
        self._capacity = sticky_capacity
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"abflow-sdk-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                   "enable.partition.eof": True, "log.connection.close": False})
        self._thread = threading.Thread(target=self._follow, name="abflow-sdk-weights", daemon=True)
        self._thread.start()

    # -- weights ------------------------------------------------------------------------

    def _follow(self) -> None:
        """Read the compacted allocations topic from the start, then keep following it."""
        metadata = self._consumer.list_topics(self.topics.allocations, timeout=10).topics[self.topics.allocations]
        self._consumer.assign([TopicPartition(self.topics.allocations, p, 0) for p in metadata.partitions])
        caught_up: set[int] = set()
        while not self._stop.is_set():
            for message in self._consumer.consume(500, 0.2):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        caught_up.add(message.partition())
                        if caught_up >= set(metadata.partitions):
                            self._ready.set()
                    continue
                record = orjson.loads(message.value())
                with self._lock:
                    known = self._weights.get(record["experiment_id"])
                    if known is None or record["version"] > known[0]:
                        self._weights[record["experiment_id"]] = (record["version"], record["weights"])
        self._consumer.close()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Whether the current weights of every experiment have been read (at start-up)."""
        return self._ready.wait(timeout)

    def weights(self, experiment_id: str) -> tuple[int, dict[str, float]]:
        with self._lock:
            found = self._weights.get(experiment_id)
        if found is None:
            raise UnknownExperiment(f"no weights for experiment {experiment_id!r} on {self.topics.allocations}")
        return found

    # -- serving --------------------------------------------------------------------------

    def assign(self, experiment_id: str, user_id: str, unit_id: str | None = None) -> Served:
        """The user's variant: where this process first put the unit, else drawn from the current weights.

        The unit is the user unless ``unit_id`` says otherwise (a session id, for
        experiments whose config says ``unit: session``); events still carry the user.
        """
        unit = user_id if unit_id is None else unit_id
        key = (experiment_id, unit)
        with self._lock:
            served = self._sticky.get(key)
            found = self._weights.get(experiment_id)
            # A variant whose weight fell to zero (a rollout rolled back) is no longer served.
            if served is not None and (found is None or found[1].get(served.variant, 0.0) > 0):
                self._sticky.move_to_end(key)
                return Served(experiment_id, user_id, served.variant, served.propensity, served.version,
                              str(uuid.uuid4()))
        if found is None:
            raise UnknownExperiment(f"no weights for experiment {experiment_id!r} on {self.topics.allocations}")
        version, weights = found
        variant = choose(weights, hash_point(experiment_id, unit, self.salt))
        served = Served(experiment_id, user_id, variant, weights[variant] / sum(weights.values()), version,
                        str(uuid.uuid4()))
        with self._lock:
            self._sticky[key] = served
            if len(self._sticky) > self._capacity:
                self._sticky.popitem(last=False)
        return served

    def invocation(self, served: Served, latency_ms: float | None = None, error: bool = False,
                   model_version: str | None = None) -> None:
        self.publisher.publish(Invocation(served.invocation_id, served.experiment_id, served.variant, served.user_id,
                                          time.time(), served.propensity, latency_ms, error, model_version))

    def conversion(self, served: Served, reward: float = 1.0) -> None:
        self.publisher.publish(Conversion(str(uuid.uuid4()), served.experiment_id, served.variant, served.user_id,
                                          time.time(), reward, served.invocation_id))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.publisher.close()

    def __enter__(self) -> "ServingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
