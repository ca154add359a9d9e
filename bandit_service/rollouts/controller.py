"""The rollout controller: runs ``bandit_service.rollouts.machine``'s state machine on PostgreSQL.

It runs inside the weight refresher's leader (one leader at a time, by an
advisory lock), which calls ``check`` for a rollout experiment whenever its
aggregates change and at every poll. A rollout checks at most once per
``check_interval_seconds``; a change that comes sooner is checked as soon as the
interval is over, not left for the next change. Each check is one transaction holding the
rollout's row lock (``FOR UPDATE``), so operator commands and checks never
interleave, and a controller killed at any point leaves either the state
before the check or the state after it. The weights are then *reconciled*: if
the newest allocation is not what the state says, the controller publishes
the right one through the same allocations history and topic as the bandit.
A controller that died between the two publishes them when it, or the next
leader, checks again.

Transitions are stored with their reason and figures; the webhook of each is
sent afterwards from a background thread and marked, so a crash resends
rather than loses it (at least once).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone

import psycopg

from abflow.core.config import ExperimentConfig, parse_config
from abflow.core.errors import ExperimentNotFound, NotFound
from abflow.core.windowing import LATENCY_BUCKETS
from bandit_service.allocations import publish_allocation, same_weights
from bandit_service.report.load import moments_by_variant, unit_variables
from bandit_service.rollouts import machine as rollout
from bandit_service.rollouts import webhooks
from storage import rollouts as store
from storage.allocations import latest_allocation
from storage.db import connect
from storage.queries import notify_aggregates, stored_config
from storage.units import stage_exposure, stage_moments

log = logging.getLogger("abflow.rollout")

STRATEGY = "Rollout"


class NoRollout(NotFound):
    """The experiment exists but has no rollout plan."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _load_state(conn: psycopg.Connection, experiment_id: str) -> tuple[rollout.RolloutState, datetime | None] | None:
    row = store.lock_state(conn, experiment_id)
    if row is None:
        return None
    return rollout.RolloutState(*row[:5]), row[5]


def _ensure_started(conn: psycopg.Connection, config: ExperimentConfig, now: datetime):
    """The rollout's state, locked; a rollout seen for the first time starts at its first stage."""
    found = _load_state(conn, config.experiment_id)
    if found is not None:
        return found
    state = rollout.start(config.rollout, now)
    if store.insert_state(conn, config.experiment_id, state.state, state.stage, state.stage_started_at,
                          state.deadline_at):
        _record(conn, config, "controller", "start", None, state,
                f"rollout of {config.rollout.challenger} started at {config.rollout.stages[0]:g}%", {})
    return _load_state(conn, config.experiment_id)


def _save(conn: psycopg.Connection, experiment_id: str, state: rollout.RolloutState, checked_at: datetime | None = None,
          figures: dict | None = None) -> None:
    store.save_state(conn, experiment_id, state.state, state.stage, state.stage_started_at, state.deadline_at,
                     state.failed_checks, checked_at, figures)


def _record(conn: psycopg.Connection, config: ExperimentConfig, actor: str, action: str,
            before: rollout.RolloutState | None, after: rollout.RolloutState, reason: str, figures: dict) -> None:
    quiet = not config.rollout.webhook_url  # without a webhook there is nothing to send
    store.insert_transition(
        conn, config.experiment_id, actor, action, before and before.state, after.state, before and before.stage,
        after.stage, reason, {**figures, "weights": rollout.stage_weights(config, after.state, after.stage)},
        _now() if quiet else None, "no webhook" if quiet else None)


class RolloutController:
    def __init__(self, publisher, allocations_topic: str, database_url: str):
        self.publisher = publisher
        self.topic = allocations_topic
        self.database_url = database_url  # libpq form, for the webhook thread's own connection
        self._sending: set[str] = set()  # rollouts with a webhook sender running
        self._again: set[str] = set()  # rollouts with transitions the sender may not have seen
        self._lock = threading.Lock()
        self._deferred: dict[str, float] = {}  # rollout -> monotonic time its next check is due

    def check(self, conn: psycopg.Connection, config: ExperimentConfig, now: datetime | None = None) -> str:
        """One check of a rollout (``conn`` in autocommit mode); returns its state afterwards."""
        now = now or _now()
        experiment_id = config.experiment_id
        known = store.state_and_stage(conn, experiment_id)
        if known is not None and self.reconcile(conn, config, *known) is not None:
            # A controller died between a transition and its weights: the stage has not served yet,
            # so it is judged from the next check on, not on units its weights never placed.
            self._defer(experiment_id, config.rollout.check_interval_seconds)
            return known[0]
        with conn.transaction():
            current, last_check_at = _ensure_started(conn, config, now)
            wait = 0.0 if last_check_at is None else \
                config.rollout.check_interval_seconds - (now - last_check_at).total_seconds()
            if current.state == rollout.RUNNING:
                if wait <= 0:
                    self._judge(conn, config, current, now)
                else:
                    # Too soon after the last check: check again once the interval is over
                    # rather than at the next notification, which may come much later.
                    self._defer(experiment_id, wait)
        state, stage = store.state_and_stage(conn, experiment_id)
        self.reconcile(conn, config, state, stage)
        if config.rollout.webhook_url:
            self._notify_pending(config)
        return state

    def _defer(self, experiment_id: str, seconds: float) -> None:
        at = time.monotonic() + seconds
        self._deferred[experiment_id] = min(at, self._deferred.get(experiment_id, at))

    def seconds_to_deferred(self) -> float | None:
        """Seconds until the soonest deferred check is due (None: none is waiting)."""
        if not self._deferred:
            return None
        return max(0.0, min(self._deferred.values()) - time.monotonic())

    def take_due(self) -> list[str]:
        """The rollouts whose deferred check is due now; they are no longer deferred."""
        now = time.monotonic()
        due = sorted(experiment_id for experiment_id, at in self._deferred.items() if at <= now)
        for experiment_id in due:
            del self._deferred[experiment_id]
        return due

    def _judge(self, conn, config: ExperimentConfig, current: rollout.RolloutState, now: datetime) -> None:
        histograms = store.stage_histograms(conn, config.experiment_id, current.stage_started_at, LATENCY_BUCKETS)
        # Every unit the stage served, in the variant it served it, on its events in the stage (the
        # stage is its own attribution window: metrics' own windows do not apply).
        stage_config = replace(config, metrics=tuple(replace(m, attribution_window_seconds=None)
                                                     for m in config.metrics))
        variables, pairs = unit_variables(stage_config)
        rows = stage_moments(conn, config.experiment_id, current.stage_started_at.timestamp(), variables, pairs)
        units = moments_by_variant(rows, list(variables), pairs)
        judgement = rollout.judge(config, current, now, units, histograms)
        after = rollout.apply(config, current, judgement, now)
        figures = {**judgement.figures, "action": judgement.action, "reasons": list(judgement.reasons)}
        plan = config.rollout
        if judgement.action == rollout.ADVANCE and plan.confirm_url and after.state == rollout.COMPLETED:
            gate = webhooks.confirm(plan.confirm_url, {"experiment_id": config.experiment_id, "challenger":
                                    plan.challenger, "promote_to": 100, "figures": figures},
                                    plan.webhook_timeout_seconds)
            if not gate.delivered:
                waiting = f"waiting for confirmation at {plan.confirm_url} ({gate.detail})"
                if store.last_action(conn, config.experiment_id) != "await":
                    _record(conn, config, "gate", "await", current, current, waiting, figures)
                _save(conn, config.experiment_id, current, now, {**figures, "reasons": [waiting]})
                return
        _save(conn, config.experiment_id, after, now, figures)
        if after.state != current.state or after.stage != current.stage:
            _record(conn, config, "controller", judgement.action, current, after, "; ".join(judgement.reasons),
                    figures)
            log.info("rollout %s: %s -> %s stage %d: %s", config.experiment_id, current.state, after.state,
                     after.stage, "; ".join(judgement.reasons))

    def reconcile(self, conn: psycopg.Connection, config: ExperimentConfig, state: str, stage: int) -> int | None:
        """Publish the state's weights unless they are already the newest allocation."""
        weights = rollout.stage_weights(config, state, stage)
        phase = rollout.phase_name(state, stage, config.rollout)
        latest = latest_allocation(conn, config.experiment_id)
        if latest is not None and latest[1] == phase and same_weights(latest[2], weights):
            return None
        # Not sticky: every unit, returning ones too, is placed by its hash on the stage's weights.
        version = publish_allocation(conn, self.publisher, self.topic, config.experiment_id, STRATEGY, phase, weights,
                                     {"rollout": {"state": state, "stage": stage}}, sticky=False)
        log.info("rollout %s: weights version %d (%s)", config.experiment_id, version, phase)
        return version

    # -- webhooks ---------------------------------------------------------------------------

    def _notify_pending(self, config: ExperimentConfig) -> None:
        """Send the rollout's unsent transitions from a background thread (one per rollout)."""
        with self._lock:
            self._again.add(config.experiment_id)
            if config.experiment_id in self._sending:
                return  # the running sender looks again before it stops
            self._sending.add(config.experiment_id)
        threading.Thread(target=self._send, args=(config,), daemon=True,
                         name=f"abflow-webhook-{config.experiment_id}").start()

    def _send(self, config: ExperimentConfig) -> None:
        plan = config.rollout
        try:
            with connect(self.database_url) as conn:
                while True:
                    with self._lock:
                        if config.experiment_id not in self._again:
                            self._sending.discard(config.experiment_id)
                            return
                        self._again.discard(config.experiment_id)
                    for transition in store.unsent_transitions(conn, config.experiment_id):
                        payload = {"experiment_id": config.experiment_id, "challenger": plan.challenger,
                                   **transition, "at": transition["at"].isoformat()}
                        delivery = webhooks.post_json(plan.webhook_url, payload, plan.webhook_timeout_seconds,
                                                      plan.webhook_retries)
                        outcome = (f"delivered after {delivery.attempts} attempt(s)" if delivery.delivered else
                                   f"gave up after {delivery.attempts} attempt(s): {delivery.detail}")
                        store.mark_sent(conn, transition["id"], outcome)
        except psycopg.Error as exc:
            log.warning("rollout %s: webhooks not sent: %s", config.experiment_id, exc)
        with self._lock:
            self._sending.discard(config.experiment_id)


# -- operator commands and status (any process) ------------------------------------------------

def _config(conn: psycopg.Connection, experiment_id: str) -> ExperimentConfig:
    raw = stored_config(conn, experiment_id)
    if raw is None:
        raise ExperimentNotFound(experiment_id)
    config = parse_config(raw)
    if config.rollout is None:
        raise NoRollout(f"experiment {experiment_id!r} has no rollout plan (add 'rollout:' to its config)")
    return config


def operate(conn: psycopg.Connection, experiment_id: str, action: str, actor: str = "operator",
            reason: str | None = None) -> dict:
    """pause, resume, promote or abort a rollout; raises ``TransitionRefused`` or ``NoRollout``.
    The controller publishes the new weights when the notification reaches it."""
    config = _config(conn, experiment_id)
    now = _now()
    with conn.transaction():
        current, _ = _ensure_started(conn, config, now)
        after = rollout.operate(config, current, action, now)
        _save(conn, experiment_id, after)
        _record(conn, config, actor, action, current, after, reason or f"{action} by the {actor}", {})
        notify_aggregates(conn, experiment_id)
    return status(conn, experiment_id)


def _exposure(per_variant: dict[str, dict[str, int]], challenger: str) -> dict:
    """The stage's measured exposure, and the challenger's share of it (None before any)."""
    shares = {}
    for measure in ("units", "invocations"):
        total = sum(v[measure] for v in per_variant.values())
        shares[f"challenger_share_of_{measure}"] = per_variant.get(challenger, {}).get(measure, 0) / total \
            if total else None
    return {"variants": per_variant, **shares}


def status(conn: psycopg.Connection, experiment_id: str, transitions: int = 50) -> dict:
    """The plan, the state, the newest check's figures, the weights in force and the transitions."""
    config = _config(conn, experiment_id)
    plan = config.rollout
    row = store.status_row(conn, experiment_id)
    latest = latest_allocation(conn, experiment_id)
    result = {"experiment_id": experiment_id, "challenger": plan.challenger, "stages": list(plan.stages),
              "plan": config.to_dict()["rollout"], "state": "not started", "stage": None, "percent": None,
              "weights": None if latest is None else {"version": latest[0], "phase": latest[1], "weights": latest[2]},
              "transitions": []}
    if row is not None:
        state, stage, started, deadline, failed, checked_at, last_check = row
        result.update(state=state, stage=stage, percent=plan.stages[stage], stage_started_at=started.isoformat(),
                      deadline_at=deadline.isoformat(), failed_checks=failed,
                      last_check_at=checked_at and checked_at.isoformat(), last_check=last_check,
                      exposure=_exposure(stage_exposure(conn, experiment_id, started.timestamp()), plan.challenger))
    for item in store.transitions(conn, experiment_id, transitions):
        result["transitions"].append({**item, "at": item["at"].isoformat()})
    return result
