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

Shadow releases: ``tee`` serves one model's answer and calls shadow models on
the side (a thread pool, so the user does not wait for them), then logs the
served invocation and, per shadow, a shadow event with both latencies, both
errors, whether the answers agreed, and both predictions:

    answer = client.tee(served, lambda: champion.predict(x), {"model-v3": lambda: v3.predict(x)})

A user outside the experiment's share of its layer (config ``layer`` and
``traffic``) gets the champion with ``in_experiment`` false; ``invocation`` and
``conversion`` log nothing for it, so experiments of one layer never share a user.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition

from abflow.core.buckets import DEFAULT_SALT, LAYER_BUCKETS, choose, hash_point, layer_bucket
from abflow.core.errors import ExperimentNotFound, Invalid
from abflow.settings import Topics
from producers.contracts import Conversion, Invocation, Shadow
from producers.publisher import KAFKA_LOG, Publisher

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_LOGGED_PREDICTION_BYTES = 8 * 1024  # larger predictions are logged as their size only


def loggable(prediction: object) -> object:
    """The prediction as JSON values (numpy arrays included), or a note of what could not be logged."""
    try:
        raw = orjson.dumps(prediction, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return {"unloggable": type(prediction).__name__}
    if len(raw) > MAX_LOGGED_PREDICTION_BYTES:
        return {"truncated_bytes": len(raw)}
    return orjson.loads(raw)


@dataclass(frozen=True)
class Served:
    experiment_id: str
    user_id: str
    variant: str
    propensity: float
    version: int
    invocation_id: str
    in_experiment: bool = True  # False outside the experiment's share of its layer: no events are logged


class UndeclaredShadow(Invalid):
    """``tee`` was asked to call a shadow the experiment's config does not declare."""


@dataclass(frozen=True)
class _Serving:
    """What the newest allocations record says about serving one experiment."""

    version: int
    weights: dict[str, float]
    champion: str | None
    layer: str
    buckets: tuple[int, int]
    shadows: frozenset[str]
    sticky: bool = True  # False for a rollout's weights: place every unit by its hash, never from memory
    status: str = "running"  # paused: no new unit enters; stopped: no unit is in the experiment


class ServingClient:
    def __init__(self, bootstrap: str, topics: Topics | None = None, salt: str = DEFAULT_SALT,
                 sticky_capacity: int = 1_000_000, publisher: Publisher | None = None, shadow_threads: int = 4,
                 weights_timeout: float = 5.0):
        """``weights_timeout``: how long the first ``assign`` of an experiment waits for its weights
        (the client reads them in the background from its start) before it raises."""
        self.topics = topics or Topics()
        self.salt = salt
        self.bootstrap = bootstrap
        self.weights_timeout = weights_timeout
        self.publisher = publisher or Publisher(bootstrap, self.topics)
        self._serving: dict[str, _Serving] = {}
        self._sticky: OrderedDict[tuple[str, str], Served] = OrderedDict()
        self._capacity = sticky_capacity
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # notified whenever weights arrive
        self._shadow_pool = ThreadPoolExecutor(shadow_threads, thread_name_prefix="abflow-shadow")
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"abflow-sdk-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                   "enable.partition.eof": True, "log.connection.close": False, "logger": KAFKA_LOG})
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
                experiment_id = record["experiment_id"]
                layer = record.get("layer") or {"name": experiment_id, "buckets": [0, LAYER_BUCKETS]}
                serving = _Serving(record["version"], record["weights"], record.get("champion"), layer["name"],
                                   tuple(layer["buckets"]), frozenset(record.get("shadows") or ()),
                                   bool(record.get("sticky", True)), record.get("status", "running"))
                with self._lock:
                    known = self._serving.get(experiment_id)
                    if known is None or serving.version > known.version:
                        self._serving[experiment_id] = serving
                        self._arrived.notify_all()
        self._consumer.close()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Whether the current weights of every experiment have been read (at start-up)."""
        return self._ready.wait(timeout)

    def _current(self, experiment_id: str) -> _Serving:
        """The experiment's newest weights, waiting up to ``weights_timeout`` for the first ones."""
        with self._lock:
            found = self._serving.get(experiment_id)
            if found is None:
                self._arrived.wait_for(lambda: experiment_id in self._serving, self.weights_timeout)
                found = self._serving.get(experiment_id)
        if found is None:
            raise self._unknown(experiment_id)
        return found

    def _unknown(self, experiment_id: str) -> ExperimentNotFound:
        return ExperimentNotFound(
            experiment_id, f"no weights for it on topic {self.topics.allocations!r} at {self.bootstrap} after "
                           f"{self.weights_timeout:g} s; check that the experiment is registered and running, that "
                           "`abflow serve` (its weight refresher) runs against the same broker, and that this "
                           "client's bootstrap servers and topic names are the service's")

    def weights(self, experiment_id: str) -> tuple[int, dict[str, float]]:
        """(version, weights) of the newest allocation."""
        found = self._current(experiment_id)
        return found.version, found.weights

    # -- serving --------------------------------------------------------------------------

    def assign(self, experiment_id: str, user_id: str, unit_id: str | None = None) -> Served:
        """The user's variant: where this process first put the unit, else drawn from the current weights
        (during a rollout, always by its hash on the stage's weights). A paused experiment takes no new
        unit and a stopped one none: they get the champion (or the promoted winner), ``in_experiment`` false.

        The unit is the user unless ``unit_id`` says otherwise (a session id, for
        experiments whose config says ``unit: session``); events still carry the user.
        """
        unit = user_id if unit_id is None else unit_id
        key = (experiment_id, unit)
        with self._lock:
            served = self._sticky.get(key)
            found = self._serving.get(experiment_id)
            # A variant whose weight fell to zero (a rollout rolled back) is no longer served, a
            # rollout places every unit by its hash, and a stopped experiment holds no unit.
            if served is not None and (found is None or (found.sticky and found.status != "stopped"
                                                         and found.weights.get(served.variant, 0.0) > 0)):
                self._sticky.move_to_end(key)
                return Served(experiment_id, user_id, served.variant, served.propensity, served.version,
                              str(uuid.uuid4()))
        if found is None:
            found = self._current(experiment_id)
        version, weights = found.version, found.weights
        start, end = found.buckets
        outside = found.status != "running" or (found.champion is not None
                                                 and not start <= layer_bucket(found.layer, unit, self.salt) < end)
        if outside:  # the champion (or the winner), and no events for the experiment
            return Served(experiment_id, user_id, found.champion or next(iter(weights)), 1.0, version,
                          str(uuid.uuid4()), in_experiment=False)
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
        if not served.in_experiment:
            return
        self.publisher.publish(Invocation(served.invocation_id, served.experiment_id, served.variant, served.user_id,
                                          time.time(), served.propensity, latency_ms, error, model_version))

    def conversion(self, served: Served, reward: float = 1.0) -> None:
        if not served.in_experiment:
            return
        self.publisher.publish(Conversion(str(uuid.uuid4()), served.experiment_id, served.variant, served.user_id,
                                          time.time(), reward, served.invocation_id))

    def tee(self, served: Served, serve: Callable[[], T], shadows: dict[str, Callable[[], object]],
            agree: Callable[[object, object], bool] = operator.eq) -> T:
        """Return ``serve()``'s answer (or raise its error); call each shadow on the side.

        Logs the served invocation (its latency and error) and, once each shadow has
        answered, a shadow event comparing the two with ``agree``. Nothing a shadow
        does (an error, slowness) reaches the user. Units outside the experiment get
        ``serve()`` only.
        """
        undeclared = sorted(set(shadows) - self._current(served.experiment_id).shadows)
        if undeclared:
            declared = ", ".join(sorted(self._current(served.experiment_id).shadows)) or "none"
            raise UndeclaredShadow(f"experiment {served.experiment_id!r} declares no shadow "
                                   f"{', '.join(map(repr, undeclared))} (declared: {declared}); add it to the "
                                   "config's `shadows`, or its events would all be dead letters")
        if not served.in_experiment:
            return serve()
        pending = {name: self._shadow_pool.submit(_timed, call) for name, call in shadows.items()}
        answer, failure, latency_ms = _timed(serve)
        self.invocation(served, latency_ms=latency_ms, error=failure is not None)
        for name, future in pending.items():
            future.add_done_callback(lambda done, name=name: self._log_shadow(served, name, done, answer, failure,
                                                                               latency_ms, agree))
        if failure is not None:
            raise failure
        return answer

    def _log_shadow(self, served: Served, name: str, done: Future, answer, failure, latency_ms: float,
                    agree: Callable[[object, object], bool]) -> None:
        shadow_answer, shadow_failure, shadow_latency_ms = done.result()
        agreed = None
        if failure is None and shadow_failure is None:
            try:
                agreed = bool(agree(answer, shadow_answer))
            except Exception:  # a comparator that cannot compare: the pair counts as not compared
                log.exception("comparing %s with %s failed", name, served.variant)
        self.publisher.publish(Shadow(
            str(uuid.uuid4()), served.experiment_id, name, served.variant, served.user_id, time.time(),
            shadow_latency_ms, shadow_failure is not None, latency_ms, failure is not None, agreed,
            None if shadow_failure is not None else loggable(shadow_answer),
            None if failure is not None else loggable(answer)))

    def close(self) -> None:
        self._shadow_pool.shutdown(wait=True)  # every shadow call answered and logged
        self._stop.set()
        self._thread.join(5)
        self.publisher.close()

    def __enter__(self) -> "ServingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _timed(call: Callable[[], T]) -> tuple[T | None, BaseException | None, float]:
    """(answer, error, milliseconds) of one call."""
    started = time.perf_counter()
    try:
        answer, failure = call(), None
    except Exception as exc:
        answer, failure = None, exc
    return answer, failure, (time.perf_counter() - started) * 1000
