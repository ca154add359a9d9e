"""The weight refresher: new aggregates in, allocation weights out, within a second.

One replica leads at a time: it holds a PostgreSQL advisory lock on the same
session it listens and writes on, so a leader that loses its connection loses
the lock and can no longer write. The others wait for the lock; the one that
gets it recomputes every running experiment at once, so a takeover loses no
update. The leader wakes on the sink's NOTIFY (sent when a batch commits) and
also recomputes everything every ``poll_seconds`` as a safety net.

Each change of weights is a new row in ``allocations`` (version, strategy,
phase, weights and the statistics used) and a record on the compacted topic
``abflow.allocations`` keyed by experiment id. The record is published and
flushed inside the transaction that inserts the row, so the history never
holds a version the topic did not get; a crash between the two can repeat a
version on the topic, never skip one.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg

from abflow.core.config import parse_config
from abflow.core.text import json_safe
from abflow.settings import Settings
from bandit_service.allocations import allocation_record, publish_allocation, same_weights
from bandit_service.policies import ArmStats, PolicyConfig, PolicyInputError, allocate
from bandit_service.rollouts.controller import RolloutController
from producers.publisher import Publisher
from storage import allocations as store
from storage.db import connect
from storage.queries import listen_for_aggregates
from storage.retention import Retention, prune

log = logging.getLogger("abflow.refresher")

LEADER_LOCK = 7401202  # pg advisory lock key of the refresher leader
PRUNE_EVERY_SECONDS = 3600.0


class WeightRefresher:
    def __init__(self, settings: Settings, publisher: Publisher, poll_seconds: float = 5.0, seed: int = 0):
        self.settings = settings
        self.publisher = publisher
        self.poll_seconds = poll_seconds
        self.seed = seed
        self.leading = threading.Event()
        self.rollouts = RolloutController(publisher, settings.topics.allocations, settings.libpq_url)
        self._pruned_at = -PRUNE_EVERY_SECONDS  # the first lead prunes at once

    # -- leadership and the loop -------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Lead when the lock is free, refresh until ``stop`` is set; survive PostgreSQL restarts."""
        while not stop.is_set():
            try:
                with connect(self.settings.libpq_url, connect_timeout=5) as conn:
                    if self._wait_for_lock(conn, stop):
                        self._lead(conn, stop)
            except psycopg.OperationalError as exc:
                log.warning("PostgreSQL unavailable (%s); retrying", str(exc).strip()[:200])
            finally:
                if self.leading.is_set():
                    log.info("no longer leading")
                self.leading.clear()
            stop.wait(1.0)

    def _wait_for_lock(self, conn: psycopg.Connection, stop: threading.Event) -> bool:
        announced = False
        while not stop.is_set():
            if store.try_leader_lock(conn, LEADER_LOCK):
                return True
            if not announced:
                log.info("standing by: another refresher leads")
                announced = True
            stop.wait(0.5)
        return False

    def _lead(self, conn: psycopg.Connection, stop: threading.Event) -> None:
        listen_for_aggregates(conn)
        self.leading.set()
        log.info("leading: refreshing allocation weights")
        self.republish_latest(conn)
        self.refresh_all(conn)
        last_full = time.monotonic()
        while not stop.is_set():
            changed: set[str] = set()
            deferred = self.rollouts.seconds_to_deferred()
            wait = 0.5 if deferred is None else min(0.5, max(0.001, deferred))
            for note in conn.notifies(timeout=wait, stop_after=1):
                changed.add(note.payload)
            if changed:
                # Gather what else arrives in the next few ms: one refresh per burst.
                for note in conn.notifies(timeout=0.02):
                    changed.add(note.payload)
            changed.update(self.rollouts.take_due())
            for experiment_id in sorted(changed):
                self.refresh(conn, experiment_id)
            if time.monotonic() - last_full >= self.poll_seconds:
                self.refresh_all(conn)
                last_full = time.monotonic()
            if time.monotonic() - self._pruned_at >= PRUNE_EVERY_SECONDS:
                self.prune()

    def prune(self) -> None:
        """The retention (storage.retention), on its own connection: the leader's is in autocommit."""
        self._pruned_at = time.monotonic()
        try:
            with connect(self.settings.libpq_url, autocommit=False, connect_timeout=5) as conn:
                deleted = prune(conn, Retention.from_settings(self.settings), time.time())
            if any(deleted.values()):
                log.info("retention: deleted %s", ", ".join(f"{n:,} {table}" for table, n in deleted.items() if n))
        except psycopg.Error as exc:
            log.warning("retention not applied (%s); next try in an hour", str(exc).strip()[:200])

    # -- one experiment ------------------------------------------------------------------

    def republish_latest(self, conn: psycopg.Connection) -> None:
        """Put each experiment's newest version on the topic again, with its status now.

        The topic is a cache of the history: a broker that lost it (the embedded
        one keeps topics in memory) gets it back when a leader starts.
        """
        for experiment_id, version, strategy, phase, weights, computed_at, sticky in \
                store.latest_of_every_experiment(conn):
            champion, layer, shadows, status = store.serving_context(conn, experiment_id)
            self.publisher.produce(self.settings.topics.allocations,
                                   allocation_record(experiment_id, version, strategy, phase, weights, computed_at,
                                                     champion, layer, shadows, sticky, status), key=experiment_id)
        self.publisher.flush(10)

    def refresh_all(self, conn: psycopg.Connection) -> None:
        for experiment_id in store.running_experiments(conn):
            self.refresh(conn, experiment_id)

    def refresh(self, conn: psycopg.Connection, experiment_id: str) -> int | None:
        """Recompute one experiment's weights; store and publish them if they changed. Returns the new version."""
        experiment = store.policy_settings(conn, experiment_id)
        if experiment is None or experiment[5] != "running":
            return None
        strategy, epsilon, warmup, min_weight, reward_model, _, raw_config = experiment
        if raw_config.get("rollout"):
            # A rollout's controller owns its weights.
            self.rollouts.check(conn, parse_config(raw_config))
            return None
        arms = [ArmStats(*row) for row in store.arm_totals(conn, experiment_id)]
        config = PolicyConfig(strategy, epsilon, warmup, min_weight, reward_model, self.seed)
        try:
            allocation = allocate(arms, config)
        except PolicyInputError as exc:
            log.warning("experiment %s: weights not refreshed: %s", experiment_id, exc)
            return None
        latest = store.latest_allocation(conn, experiment_id)
        if latest is not None and latest[1] == allocation.phase and same_weights(latest[2], allocation.weights):
            return None
        statistics = {
            "variants": {a.name: {"invocations": a.invocations, "reward_sum": a.reward_sum,
                                  "reward_sq_sum": a.reward_sq_sum} for a in arms},
            "policy": json_safe(allocation.detail),
        }
        version = publish_allocation(conn, self.publisher, self.settings.topics.allocations, experiment_id, strategy,
                                     allocation.phase, allocation.weights, statistics)
        log.info("experiment %s: version %d (%s) %s", experiment_id, version, allocation.phase,
                 ", ".join(f"{k}={v:.3f}" for k, v in allocation.weights.items()))
        return version
