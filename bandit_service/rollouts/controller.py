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
from datetime import datetime, timezone

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from abflow.core.errors import NotFound
from bandit_service.rollouts import machine as rollout, webhooks
from bandit_service.allocations import latest_allocation, publish_allocation, same_weights
from abflow.core.config import ExperimentConfig, parse_config
from storage.queries import AGGREGATES_CHANNEL, bucket_sums
from abflow.core.windowing import LATENCY_BUCKETS

log = logging.getLogger("abflow.rollout")

STRATEGY = "Rollout"
_STATE_COLUMNS = "state, stage, stage_started_at, deadline_at, failed_checks"


class NoRollout(NotFound):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _load_state(conn: psycopg.Connection, experiment_id: str) -> tuple[rollout.RolloutState, datetime | None] | None:
    row = conn.execute(f"SELECT {_STATE_COLUMNS}, last_check_at FROM rollouts WHERE experiment_id = %s FOR UPDATE",
                       (experiment_id,)).fetchone()
    if row is None:
        return None
    return rollout.RolloutState(*row[:5]), row[5]


def _ensure_started(conn: psycopg.Connection, config: ExperimentConfig, now: datetime):
    """The rollout's state, locked; a rollout seen for the first time starts at its first stage."""
    found = _load_state(conn, config.experiment_id)
    if found is not None:
        return found
    state = rollout.start(config.rollout, now)
    inserted = conn.execute(
        f"INSERT INTO rollouts (experiment_id, {_STATE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s) "
        "ON CONFLICT DO NOTHING RETURNING 1",
        (config.experiment_id, state.state, state.stage, state.stage_started_at, state.deadline_at, 0)).fetchone()
    if inserted:
        _record(conn, config, "controller", "start", None, state,
                f"rollout of {config.rollout.challenger} started at {config.rollout.stages[0]:g}%", {})
    return _load_state(conn, config.experiment_id)


def _save(conn: psycopg.Connection, experiment_id: str, state: rollout.RolloutState, checked_at: datetime | None = None,
          figures: dict | None = None) -> None:
    conn.execute(
        "UPDATE rollouts SET state = %s, stage = %s, stage_started_at = %s, deadline_at = %s, failed_checks = %s, "
        "last_check_at = coalesce(%s, last_check_at), last_check = coalesce(%s, last_check), updated_at = now() "
        "WHERE experiment_id = %s",
        (state.state, state.stage, state.stage_started_at, state.deadline_at, state.failed_checks, checked_at,
         None if figures is None else Jsonb(figures), experiment_id))


def _record(conn: psycopg.Connection, config: ExperimentConfig, actor: str, action: str,
            before: rollout.RolloutState | None, after: rollout.RolloutState, reason: str, figures: dict) -> None:
    conn.execute(
        "INSERT INTO rollout_transitions (experiment_id, actor, action, from_state, to_state, from_stage, to_stage, "
        "reason, figures, notified_at, notification) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (config.experiment_id, actor, action, before and before.state, after.state, before and before.stage,
         after.stage, reason, Jsonb({**figures, "weights": rollout.stage_weights(config, after.state, after.stage)}),
         # Without a webhook there is nothing to send.
         None if config.rollout.webhook_url else _now(), None if config.rollout.webhook_url else "no webhook"))


def stage_aggregates(conn: psycopg.Connection, experiment_id: str, since: datetime):
    """Sums per variant, and latency histograms, of the windows that overlap [since, now)."""
    rows = conn.execute(
        "SELECT variant, sum(invocations)::bigint, sum(conversions)::bigint, sum(reward_sum), sum(reward_sq_sum), "
        f"sum(errors)::bigint, {bucket_sums(LATENCY_BUCKETS)} FROM variant_windows WHERE experiment_id = %s "
        "AND window_start + make_interval(secs => window_seconds) > %s GROUP BY variant",
        (experiment_id, since)).fetchall()
    sums = {row[0]: {"invocations": int(row[1]), "conversions": int(row[2]), "reward_sum": float(row[3]),
                     "reward_sq_sum": float(row[4]), "errors": int(row[5])} for row in rows}
    histograms = {row[0]: [int(c) for c in row[6:]] for row in rows}
    return sums, histograms


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
        state, stage = conn.execute("SELECT state, stage FROM rollouts WHERE experiment_id = %s",
                                    (experiment_id,)).fetchone()
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
        sums, histograms = stage_aggregates(conn, config.experiment_id, current.stage_started_at)
        judgement = rollout.judge(config, current, now, sums, histograms)
        after = rollout.apply(config, current, judgement, now)
        figures = {**judgement.figures, "action": judgement.action, "reasons": list(judgement.reasons)}
        plan = config.rollout
        if judgement.action == rollout.ADVANCE and plan.confirm_url and after.state == rollout.COMPLETED:
            gate = webhooks.confirm(plan.confirm_url, {"experiment_id": config.experiment_id, "challenger":
                                    plan.challenger, "promote_to": 100, "figures": figures},
                                    plan.webhook_timeout_seconds)
            if not gate.delivered:
                waiting = f"waiting for confirmation at {plan.confirm_url} ({gate.detail})"
                last = conn.execute("SELECT action FROM rollout_transitions WHERE experiment_id = %s "
                                    "ORDER BY id DESC LIMIT 1", (config.experiment_id,)).fetchone()
                if last is None or last[0] != "await":
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
        version = publish_allocation(conn, self.publisher, self.topic, config.experiment_id, STRATEGY, phase, weights,
                                     {"rollout": {"state": state, "stage": stage}})
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
            with psycopg.connect(self.database_url, autocommit=True, row_factory=dict_row) as conn:
                while True:
                    with self._lock:
                        if config.experiment_id not in self._again:
                            self._sending.discard(config.experiment_id)
                            return
                        self._again.discard(config.experiment_id)
                    pending = conn.execute(
                        "SELECT id, at, actor, action, from_state, to_state, from_stage, to_stage, reason, figures "
                        "FROM rollout_transitions WHERE experiment_id = %s AND notified_at IS NULL ORDER BY id",
                        (config.experiment_id,)).fetchall()
                    for transition in pending:
                        payload = {"experiment_id": config.experiment_id, "challenger": plan.challenger,
                                   **transition, "at": transition["at"].isoformat()}
                        delivery = webhooks.post_json(plan.webhook_url, payload, plan.webhook_timeout_seconds,
                                                      plan.webhook_retries)
                        outcome = (f"delivered after {delivery.attempts} attempt(s)" if delivery.delivered else
                                   f"gave up after {delivery.attempts} attempt(s): {delivery.detail}")
                        conn.execute("UPDATE rollout_transitions SET notified_at = now(), notification = %s "
                                     "WHERE id = %s", (outcome, transition["id"]))
        except psycopg.Error as exc:
            log.warning("rollout %s: webhooks not sent: %s", config.experiment_id, exc)
        with self._lock:
            self._sending.discard(config.experiment_id)


# -- operator commands and status (any process) ------------------------------------------------

def _config(conn: psycopg.Connection, experiment_id: str) -> ExperimentConfig:
    row = conn.execute("SELECT config FROM experiments WHERE experiment_id = %s", (experiment_id,)).fetchone()
    if row is None:
        raise NoRollout(f"no experiment {experiment_id!r}")
    config = parse_config(row[0])
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
        conn.execute("SELECT pg_notify(%s, %s)", (AGGREGATES_CHANNEL, experiment_id))
    return status(conn, experiment_id)


def status(conn: psycopg.Connection, experiment_id: str, transitions: int = 50) -> dict:
    """The plan, the state, the newest check's figures, the weights in force and the transitions."""
    config = _config(conn, experiment_id)
    plan = config.rollout
    row = conn.execute("SELECT state, stage, stage_started_at, deadline_at, failed_checks, last_check_at, last_check "
                       "FROM rollouts WHERE experiment_id = %s", (experiment_id,)).fetchone()
    latest = latest_allocation(conn, experiment_id)
    history = conn.execute(
        "SELECT id, at, actor, action, from_state, to_state, from_stage, to_stage, reason, figures, notification "
        "FROM rollout_transitions WHERE experiment_id = %s ORDER BY id DESC LIMIT %s",
        (experiment_id, transitions)).fetchall()
    result = {"experiment_id": experiment_id, "challenger": plan.challenger, "stages": list(plan.stages),
              "plan": config.to_dict()["rollout"], "state": "not started", "stage": None, "percent": None,
              "weights": None if latest is None else {"version": latest[0], "phase": latest[1], "weights": latest[2]},
              "transitions": []}
    if row is not None:
        state, stage, started, deadline, failed, checked_at, last_check = row
        result.update(state=state, stage=stage, percent=plan.stages[stage], stage_started_at=started.isoformat(),
                      deadline_at=deadline.isoformat(), failed_checks=failed,
                      last_check_at=checked_at and checked_at.isoformat(), last_check=last_check)
    columns = ("id", "at", "actor", "action", "from_state", "to_state", "from_stage", "to_stage", "reason", "figures",
               "notification")
    for values in reversed(history):
        item = dict(zip(columns, values))
        item["at"] = item["at"].isoformat()
        result["transitions"].append(item)
    return result
