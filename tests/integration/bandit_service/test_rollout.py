"""Progressive rollouts: the stage rules, a healthy challenger promoted through every stage, an
injected fault rolled back, operator commands (CLI and API), webhooks with retries and the
confirm gate, and a controller killed mid-rollout that resumes where it was."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient

from abflow.core.config import parse_config
from abflow.core.windowing import LATENCY_BUCKETS, latency_bucket
from bandit_service.api import create_app
from bandit_service.lifecycle import promote
from bandit_service.refresher import WeightRefresher
from bandit_service.report.evidence import UnitMoments
from bandit_service.rollouts import controller as rollout_controller
from bandit_service.rollouts import machine as rollout
from bandit_service.rollouts import webhooks
from bandit_service.rollouts.machine import RolloutState
from producers.publisher import Publisher, ensure_topics
from producers.sdk import ServingClient
from producers.simulator import Fault, Scenario, VariantProfile, generate, parse_fault, virtual_clock
from storage import rollouts as rollout_store
from storage.allocations import latest_allocation
from storage.queries import AGGREGATES_CHANNEL, allocation_history
from storage.registry import create_experiment, get_experiment
from tests.conftest import ADMIN, wait_until
from tests.helpers import Assigner, counted_events, invocation, publish
from tests.integration.bandit_service.test_refresher import topic_records

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
LOOSE_GUARDRAILS = [{"name": "conversion_rate", "role": "primary"},
                    {"name": "error_rate", "role": "guardrail", "margin": 0.05},
                    {"name": "latency_p95", "role": "guardrail", "margin": 0.05}]


def rollout_config(experiment_id: str | None = None, **plan) -> dict:
    return {"experiment_id": experiment_id or f"rollout-{uuid.uuid4().hex[:8]}", "strategy": "WeightedSampling",
            "variants": [{"name": "Champion", "role": "champion"}, {"name": "Canary", "role": "challenger"}],
            "metrics": LOOSE_GUARDRAILS,
            "rollout": {"min_duration_seconds": 10, "min_sample": 1000, "max_duration_seconds": 600,
                        "check_interval_seconds": 0.001, "rollback_after": 2, "primary_margin": 0.5, **plan}}


# -- the rules, without I/O ------------------------------------------------------------------


def stage_units(rng, n_champion: int, n_canary: int, errors=(0.01, 0.01), rates=(0.1, 0.1)):
    """Units exposed in a stage, each with a few invocations (per variant, one array per variable), and
    the stage's latency histograms."""
    units, hists = {}, {}
    for name, n, error, rate in (("Champion", n_champion, errors[0], rates[0]), ("Canary", n_canary, errors[1], rates[1])):
        invocations = 1 + rng.poisson(1.0, n)
        conversions = rng.binomial(invocations, rate)
        units[name] = {"invocations": invocations, "conversions": conversions, "reward": conversions,
                       "errors": rng.binomial(invocations, error)}
        hist = [0] * LATENCY_BUCKETS
        for value in 40 * np.exp(rng.normal(0, 0.5, int(invocations.sum()))):
            hist[latency_bucket(float(value))] += 1
        hists[name] = hist
    return units, hists


def stage_sums(rng, *args, **kwargs):
    """What ``judge`` takes: the stage's units as moments, and its histograms."""
    units, hists = stage_units(rng, *args, **kwargs)
    metrics = parse_config(rollout_config()).metrics
    return {name: UnitMoments.of_units(values, metrics) for name, values in units.items()}, hists


def test_stage_rules():
    config = parse_config(rollout_config())
    rng = np.random.default_rng(3)
    state = rollout.start(config.rollout, T0)
    assert rollout.stage_weights(config, state.state, 0) == {"Champion": 0.95, "Canary": 0.05}
    assert rollout.stage_alpha(config) == pytest.approx(0.05 / 4)

    healthy = stage_sums(rng, 40_000, 4_000)
    early = rollout.judge(config, state, T0 + timedelta(seconds=5), *healthy)
    assert early.action == rollout.HOLD and any("5 s of 10 s" in r for r in early.reasons)
    short = rollout.judge(config, state, T0 + timedelta(seconds=20), *stage_sums(rng, 4_000, 400))
    assert short.action == rollout.HOLD and any("400 of 1000" in r for r in short.reasons)
    passed = rollout.judge(config, state, T0 + timedelta(seconds=20), *healthy)
    assert passed.action == rollout.ADVANCE, passed.reasons
    assert {g["metric"] for g in passed.figures["guardrails"]} == {"error_rate", "latency_p95", "conversion_rate"}
    after = rollout.apply(config, state, passed, T0 + timedelta(seconds=20))
    assert (after.state, after.stage, after.stage_started_at) == ("running", 1, T0 + timedelta(seconds=20))

    # Harm must be found in `rollback_after` checks in a row.
    harmful = stage_sums(rng, 40_000, 2_000, errors=(0.01, 0.2))
    first = rollout.judge(config, state, T0 + timedelta(seconds=1), *harmful)
    assert first.action == rollout.HOLD and first.failed_checks == 1
    second = rollout.judge(config, rollout.apply(config, state, first, T0), T0 + timedelta(seconds=2), *harmful)
    assert second.action == rollout.ROLLBACK and "error_rate" in second.reasons[0]
    rolled = rollout.apply(config, state, second, T0)
    assert rollout.stage_weights(config, rolled.state, rolled.stage) == {"Champion": 1.0, "Canary": 0.0}

    # A primary metric that collapsed is harm too, however healthy errors and latency are.
    worse = stage_sums(rng, 40_000, 4_000, rates=(0.1, 0.02))
    assert "conversion_rate" in rollout.judge(config, state, T0, *worse).reasons[0]

    # Inconclusive past the deadline: pause; and the last stage completes the rollout.
    late = rollout.judge(config, state, T0 + timedelta(seconds=601), *stage_sums(rng, 4_000, 400))
    assert late.action == rollout.PAUSE and "deadline" in late.reasons[0]
    last = RolloutState("running", 3, T0, T0 + timedelta(seconds=600))
    done = rollout.apply(config, last, rollout.judge(config, last, T0 + timedelta(seconds=20), *healthy), T0)
    assert done.state == rollout.COMPLETED and rollout.stage_weights(config, done.state, done.stage)["Canary"] == 1.0


def test_operator_transitions():
    config = parse_config(rollout_config())
    state = rollout.start(config.rollout, T0)
    paused = rollout.operate(config, state, "pause", T0)
    assert paused.state == "paused"
    with pytest.raises(rollout.TransitionRefused, match="already paused"):
        rollout.operate(config, paused, "pause", T0)
    resumed = rollout.operate(config, paused, "resume", T0 + timedelta(hours=1))
    assert resumed.state == "running" and resumed.deadline_at == T0 + timedelta(hours=1, seconds=600)
    assert resumed.stage_started_at == state.stage_started_at  # the stage's data still counts
    with pytest.raises(rollout.TransitionRefused, match="only a paused"):
        rollout.operate(config, state, "resume", T0)
    aborted = rollout.operate(config, state, "abort", T0)
    with pytest.raises(rollout.TransitionRefused, match="aborted"):
        rollout.operate(config, aborted, "resume", T0)
    assert rollout.operate(config, state, "promote", T0).state == "completed"


def test_rollout_config_errors():
    base = rollout_config("x")
    for plan, message in [({"stages": [10, 5, 100]}, "rise strictly"), ({"stages": [5, 50]}, "end at 100"),
                          ({"challenger": "Champion"}, "must be a challenger"), ({"min_sample": 0}, "min_sample"),
                          ({"webhook_url": "ftp://x"}, "http"), ({"primary_margin": 2}, "< 1"),
                          ({"max_duration_seconds": 1}, "max_duration_seconds")]:
        with pytest.raises(ValueError, match=message):
            parse_config({**base, "rollout": {**base["rollout"], **plan}})
    assert parse_config(parse_config(base).to_dict()) == parse_config(base)


def test_injected_faults_start_when_asked():
    scenario = Scenario("chaos", (VariantProfile("A", 0.5, 0.1, error_rate=0.0), VariantProfile("B", 0.5, 0.1, error_rate=0.0)),
                        faults=(parse_fault("B:errors=0.5,latency_ms=500,conversion=0,after=5"),))
    events = [e for e in generate(scenario, 20_000, virtual_clock(1_000.0)) if hasattr(e, "latency_ms")]
    before = [e for e in events if e.variant == "B" and e.timestamp < 1_005.0]
    after = [e for e in events if e.variant == "B" and e.timestamp >= 1_005.0]
    assert not any(e.error for e in before) and max(e.latency_ms for e in before) < 500
    assert 0.45 < sum(e.error for e in after) / len(after) < 0.55 and min(e.latency_ms for e in after) >= 500
    assert not any(e.error for e in events if e.variant == "A")
    assert parse_fault("B:errors=0.2") == Fault("B", 0.0, 0.2)
    for bad in ("B", "B:speed=2", "B:errors=2", "B:after=x"):
        with pytest.raises(ValueError):
            parse_fault(bad)


# -- the controller on PostgreSQL and Kafka ----------------------------------------------------


def add_window(conn, experiment_id: str, start: datetime, units: dict, hists: dict) -> None:
    """A second of traffic: its window (for the latency histograms) and its units, served by the
    rollout's current stage (as the worker writes them)."""
    stage_start = conn.execute("SELECT extract(epoch FROM stage_started_at) FROM rollouts WHERE experiment_id = %s",
                               (experiment_id,)).fetchone()[0]
    for variant, values in units.items():
        if not len(values["invocations"]):
            continue
        n_invocations, conversions = int(values["invocations"].sum()), int(values["conversions"].sum())
        conn.execute(
            "INSERT INTO variant_windows (experiment_id, variant, window_start, window_seconds, invocations,"
            " conversions, reward_sum, reward_sq_sum, errors, latency_count, latency_ms_sum, latency_hist)"
            " VALUES (%s, %s, %s, 1, %s, %s, %s, %s, %s, %s, 0, %s) ON CONFLICT DO NOTHING",
            (experiment_id, variant, start, n_invocations, conversions, conversions, conversions,
             int(values["errors"].sum()), n_invocations, hists[variant]))
        tag = uuid.uuid4().hex[:8]
        with conn.cursor() as cur, cur.copy(
                "COPY stage_units (experiment_id, stage_start, unit_id, variant, invocations, conversions, reward, "
                "errors) FROM STDIN") as copy:
            for i, (n, c, e) in enumerate(zip(values["invocations"], values["conversions"], values["errors"])):
                copy.write_row((experiment_id, stage_start, f"{tag}-{i}", variant, float(n), float(c), float(c),
                                float(e)))


def split(total: int, share: float) -> tuple[int, int]:
    canary = int(total * share)
    return total - canary, canary


@pytest.fixture
def controller(settings):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    with Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
        yield rollout_controller.RolloutController(publisher, settings.topics.allocations, settings.libpq_url)


def new_rollout(engine, **plan):
    config = parse_config(rollout_config(**plan))
    create_experiment(engine, config)
    return config


def test_a_stage_is_the_share_of_all_units_returning_ones_too(settings, engine, controller, workers):
    """The same 4,000 units come back at every stage, through the API and the SDK: each stage's
    share of units and of invocations is the stage, a unit on the canary stays on it, the stream
    measures the same shares in `rollout status` (and judges the stage on all those units), and a
    rollback sends every unit home."""
    config = new_rollout(engine, stages=[5, 25, 50, 100])
    exp, units = config.experiment_id, [f"back-{i}" for i in range(4_000)]
    visits = dict(zip(units, 1 + np.random.default_rng(17).poisson(2.0, len(units))))
    worker = workers()
    published = 0
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn, Assigner(settings.database_url) as assigned, \
            ServingClient(settings.kafka_bootstrap, settings.topics) as sdk, \
            Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
        controller.check(conn, config, T0)
        on_canary: set[str] = set()
        for stage, percent in enumerate(config.rollout.stages[:-1]):
            started = datetime.now(timezone.utc)
            rollout_store.save_state(conn, exp, "running", stage, started, started + timedelta(hours=1), 0)
            controller.reconcile(conn, config, "running", stage)
            version = latest_allocation(conn, exp)[0]
            served = {u: assigned(exp, u).variant for u in units}
            wait_until(lambda: sdk._serving.get(exp) is not None and sdk._serving[exp].version == version, 30,
                       message=f"the SDK to read version {version}")
            assert {u: sdk.assign(exp, u).variant for u in units} == served  # both paths place units alike
            now_on = {u for u, variant in served.items() if variant == "Canary"}
            # Within 2 points of the stage, plus the sampling error of 4,000 hashed units (3 standard
            # errors; for invocations, of units with their visits as clusters).
            p = percent / 100
            units_error = 3 * math.sqrt(p * (1 - p) / len(units))
            invocations_error = 3 * math.sqrt(p * (1 - p) * sum(v * v for v in visits.values())) / sum(visits.values())
            assert abs(len(now_on) / len(units) - p) <= 0.02 + units_error, (percent, len(now_on))
            share_of_invocations = sum(visits[u] for u in now_on) / sum(visits.values())
            assert abs(share_of_invocations - p) <= 0.02 + invocations_error, (percent, share_of_invocations)
            assert on_canary <= now_on  # the canary's slice only grows
            on_canary = now_on
            for unit in units:
                for _ in range(visits[unit]):
                    publish(publisher, "invocation", invocation(exp, served[unit], time.time(), unit))
            publisher.flush(30)
            published += sum(visits.values())
            wait_until(lambda: counted_events(engine, [exp]) == published, 90, message="the stage's invocations",
                       workers=[worker])
            measured = rollout_controller.status(conn, exp)["exposure"]
            assert measured["challenger_share_of_invocations"] == pytest.approx(share_of_invocations, abs=1e-9)
            assert measured["challenger_share_of_units"] == pytest.approx(len(now_on) / len(units), abs=1e-9)
            assert measured["variants"]["Canary"] == {"units": len(now_on),
                                                      "invocations": sum(visits[u] for u in now_on)}
            # The check judges the stage on every unit it served, returning ones included.
            assert controller.check(conn, config, datetime.now(timezone.utc)) == "running"
            judged = rollout_controller.status(conn, exp)["last_check"]
            assert judged["units"] == {"Canary": len(now_on), "Champion": len(units) - len(now_on)}
            assert judged["invocations"]["Canary"] == sum(visits[u] for u in now_on)
        status = rollout_controller.operate(conn, exp, "abort", "operator", "test")
        assert status["state"] == "aborted"
        controller.reconcile(conn, config, "aborted", status["stage"])
        assert {assigned(exp, u).variant for u in units} == {"Champion"}  # every unit back home
        wait_until(lambda: sdk._serving[exp].weights.get("Canary") == 0.0, 30, message="the SDK to see the abort")
        assert {sdk.assign(exp, u).variant for u in units} == {"Champion"}


def test_healthy_canary_is_promoted_through_every_stage(settings, engine, controller):
    config = new_rollout(engine)
    rng = np.random.default_rng(7)
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        now = T0
        assert controller.check(conn, config, now) == "running"
        for second in range(1, 400):
            now = T0 + timedelta(seconds=second)
            stage = conn.execute("SELECT stage FROM rollouts WHERE experiment_id = %s",
                                 (config.experiment_id,)).fetchone()[0]
            add_window(conn, config.experiment_id, now - timedelta(seconds=1),
                       *stage_units(rng, *split(4_000, config.rollout.stages[stage] / 100)))
            if controller.check(conn, config, now) == "completed":
                break
        status = rollout_controller.status(conn, config.experiment_id)
    assert status["state"] == "completed" and status["weights"]["weights"] == {"Champion": 0.0, "Canary": 1.0}
    moves = [(t["action"], t["to_stage"]) for t in status["transitions"]]
    assert moves == [("start", 0), ("advance", 1), ("advance", 2), ("advance", 3), ("advance", 4)]
    for t in status["transitions"][1:]:
        assert t["figures"]["elapsed_seconds"] >= 10 and all(g["status"] == "pass" for g in t["figures"]["guardrails"])
    # Every stage went out through the one weights channel: the history and the compacted topic.
    history = [(w["phase"], w["weights"]["Canary"]) for w in
               reversed(allocation_history(engine, config.experiment_id, 10))]
    assert history == [("rollout 5%", 0.05), ("rollout 10%", 0.1), ("rollout 25%", 0.25), ("rollout 50%", 0.5),
                       ("rollout complete", 1.0)]
    records = topic_records(settings.kafka_bootstrap, settings.topics.allocations, config.experiment_id, 5)
    assert [r["weights"]["Canary"] for r in records] == [0.05, 0.1, 0.25, 0.5, 1.0]
    assert not any(r["sticky"] for r in records)  # serving places every unit by its hash during a rollout
    for t in status["transitions"][1:]:  # what each stage served, as its transition says
        stage_share = config.rollout.stages[t["from_stage"]] / 100
        assert abs(t["figures"]["challenger_share_of_units"] - stage_share) < 0.02
        assert f"Canary served {t['figures']['challenger_share_of_units']:.1%} of its units" in t["reason"]

    # Promoted, the winner's next version is a canary of the new challenger from the first stage.
    promoted = promote(engine, controller.publisher, settings.topics.allocations, config.experiment_id, "Canary",
                       {"Canary2": "3"})
    following = parse_config(get_experiment(engine, promoted["next_experiment_id"]).config)
    assert (following.rollout.challenger, following.rollout.stages) == ("Canary2", config.rollout.stages)
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        assert controller.check(conn, following, T0) == "running"
        status = rollout_controller.status(conn, following.experiment_id)
    assert status["weights"]["weights"] == {"Canary": 0.95, "Canary2": 0.05}


def test_injected_errors_roll_back_within_two_checks(settings, engine, controller):
    config = new_rollout(engine)
    rng = np.random.default_rng(11)
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn, Assigner(settings.database_url) as assigned:
        controller.check(conn, config, T0)
        # A unit the canary got keeps it while it is healthy …
        on_canary = next(f"user-{i}" for i in range(10_000)
                         if assigned(config.experiment_id, f"user-{i}").variant == "Canary")
        for second in range(1, 5):
            add_window(conn, config.experiment_id, T0 + timedelta(seconds=second - 1), *stage_units(rng, 3_800, 200))
            assert controller.check(conn, config, T0 + timedelta(seconds=second)) == "running"
        checks = 0
        for second in range(5, 60):  # the canary starts failing 30 % of its requests
            add_window(conn, config.experiment_id, T0 + timedelta(seconds=second - 1),
                       *stage_units(rng, 3_800, 200, errors=(0.01, 0.3)))
            checks += 1
            if controller.check(conn, config, T0 + timedelta(seconds=second)) == "rolled_back":
                break
        status = rollout_controller.status(conn, config.experiment_id)
        # … and is sent back to the champion once the canary is rolled back.
        assert assigned(config.experiment_id, on_canary).variant == "Champion"
    assert status["state"] == "rolled_back", status["last_check"]
    rollback = status["transitions"][-1]
    assert rollback["action"] == "rollback" and "error_rate" in rollback["reason"]
    harm_checks = [g for g in rollback["figures"]["guardrails"] if g["metric"] == "error_rate"]
    assert harm_checks[0]["harmful"] and harm_checks[0]["low"] > 0.05
    # Harm shows at the first check with 200 faulty requests; the second in a row rolls back.
    assert checks <= 3, checks
    assert status["weights"]["weights"] == {"Champion": 1.0, "Canary": 0.0}
    assert status["weights"]["phase"] == "rollback"


def test_a_change_too_soon_after_a_check_is_checked_when_the_interval_ends(settings, engine, controller):
    config = new_rollout(engine, check_interval_seconds=60)
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        def last_check():
            return conn.execute("SELECT last_check_at FROM rollouts WHERE experiment_id = %s",
                                (config.experiment_id,)).fetchone()[0]

        controller.check(conn, config, T0)
        assert last_check() == T0 and controller.seconds_to_deferred() is None
        controller.check(conn, config, T0 + timedelta(seconds=1))  # too soon: not judged, deferred
        assert last_check() == T0
        assert 58 < controller.seconds_to_deferred() <= 59 and controller.take_due() == []
        controller.check(conn, config, T0 + timedelta(seconds=59.95))  # the sooner deadline wins
        time.sleep(0.1)
        assert controller.take_due() == [config.experiment_id]
        assert controller.seconds_to_deferred() is None and controller.take_due() == []


def test_the_refresher_runs_a_deferred_check_without_another_notification(settings, engine):
    """With the refresher's safety-net poll an hour away, only the deferral can run the second check."""
    config = new_rollout(engine, check_interval_seconds=1)
    stop = threading.Event()
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)  # as `abflow refresher` does
    with Publisher(settings.kafka_bootstrap, settings.topics) as publisher, \
            psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        refresher = WeightRefresher(settings, publisher, poll_seconds=3600)
        thread = threading.Thread(target=refresher.run, args=(stop,), daemon=True)
        thread.start()

        def last_check():
            row = conn.execute("SELECT last_check_at FROM rollouts WHERE experiment_id = %s",
                               (config.experiment_id,)).fetchone()
            return row and row[0]

        try:
            first = wait_until(last_check, 30, message="the first check")
            conn.execute("SELECT pg_notify(%s, %s)", (AGGREGATES_CHANNEL, config.experiment_id))
            second = wait_until(lambda: (last_check() or first) > first and last_check(), 10,
                                message="the deferred check")
        finally:
            stop.set()
            thread.join(10)
    assert (second - first).total_seconds() >= 1


class Hook(BaseHTTPRequestHandler):
    """Answers 500 to the first ``fail_first`` requests, then 200; records every body."""

    fail_first = 0
    received: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append(body)
        self.send_response(500 if len(type(self).received) <= type(self).fail_first else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hook_server():
    def start(fail_first: int):
        handler = type("H", (Hook,), {"fail_first": fail_first, "received": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/hook", handler

    servers: list = []
    yield start
    for server in servers:
        server.shutdown()


def test_webhook_retries_and_timeouts(hook_server):
    url, handler = hook_server(fail_first=2)
    delivery = webhooks.post_json(url, {"x": 1}, timeout=2, retries=3, backoff_seconds=0.01)
    assert delivery == webhooks.Delivery(True, 3, "HTTP 200") and len(handler.received) == 3
    url, handler = hook_server(fail_first=10)
    failed = webhooks.post_json(url, {"x": 1}, timeout=2, retries=2, backoff_seconds=0.01)
    assert not failed.delivered and failed.attempts == 3 and failed.detail == "HTTP 500"
    nobody = webhooks.post_json("http://127.0.0.1:9/none", {}, timeout=0.5, retries=1, backoff_seconds=0.01)
    assert not nobody.delivered and "Error" in nobody.detail


def test_transitions_call_the_webhook_and_the_gate_holds_the_last_stage(settings, engine, controller, hook_server):
    hook, received = hook_server(fail_first=1)
    gate, asked = hook_server(fail_first=1)  # says no once, then yes
    config = new_rollout(engine, stages=[50, 100], webhook_url=hook, confirm_url=gate, webhook_retries=2)
    rng = np.random.default_rng(5)
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        controller.check(conn, config, T0)
        states = []
        for second in range(1, 40):
            add_window(conn, config.experiment_id, T0 + timedelta(seconds=second - 1), *stage_units(rng, 1_000, 1_000))
            states.append(controller.check(conn, config, T0 + timedelta(seconds=second)))
            if states[-1] == "completed":
                break
        wait_until(lambda: conn.execute("SELECT count(*) FROM rollout_transitions WHERE experiment_id = %s AND "
                                        "notified_at IS NULL", (config.experiment_id,)).fetchone()[0] == 0,
                   15, message="webhooks delivered")
        status = rollout_controller.status(conn, config.experiment_id)
    assert [t["action"] for t in status["transitions"]] == ["start", "await", "advance"]
    assert "waiting for confirmation" in status["transitions"][1]["reason"]
    assert len(asked.received) == 2 and asked.received[0]["promote_to"] == 100
    assert [b["action"] for b in received.received] == ["start", "start", "await", "advance"]  # first one retried
    assert status["transitions"][0]["notification"] == "delivered after 2 attempt(s)"


def test_operators_steer_a_rollout_from_the_cli_and_the_api(settings, engine, controller, run_env):
    config = new_rollout(engine)
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        controller.check(conn, config, T0)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "abflow.cli", "rollout", *args], env=run_env,
                              capture_output=True, text=True, timeout=60)

    paused = cli("pause", config.experiment_id, "--reason", "looking into a ticket")
    assert paused.returncode == 0 and "PAUSED at stage 1/5 (5%)" in paused.stdout, paused.stderr
    again = cli("pause", config.experiment_id)
    assert again.returncode == 1 and "already paused" in again.stderr
    assert cli("status", "no-such-experiment").returncode == 1
    shown = json.loads(cli("status", config.experiment_id, "--json").stdout)
    assert shown["transitions"][-1]["reason"] == "looking into a ticket" and shown["transitions"][-1]["actor"] == "operator"

    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    with TestClient(create_app(settings)) as client:
        path = f"/experiments/{config.experiment_id}/rollout"
        assert client.post(f"{path}/resume").status_code == 401
        resumed = client.post(f"{path}/resume", headers=ADMIN)
        assert resumed.status_code == 200 and resumed.json()["state"] == "running"
        assert client.post(f"{path}/resume", headers=ADMIN).status_code == 409
        assert client.post(f"{path}/explode", headers=ADMIN).status_code == 422
        aborted = client.post(f"{path}/abort", json={"reason": "budget"}, headers=ADMIN)
        assert aborted.json()["state"] == "aborted"
        assert client.get(path, headers=ADMIN).json()["transitions"][-1]["actor"] == "api"
        assert client.get("/experiments/nope/rollout", headers=ADMIN).status_code == 404
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        controller.check(conn, config)  # the controller publishes what the operator decided
        assert rollout_controller.status(conn, config.experiment_id)["weights"]["weights"]["Canary"] == 0.0


def test_a_killed_controller_resumes_where_it_was(settings, engine, services):
    """The controller runs in `abflow refresher`; kill -9 it mid-rollout and start another."""
    config = new_rollout(engine, min_duration_seconds=1, min_sample=200, check_interval_seconds=0.2,
                         stages=[5, 10, 25, 50, 75, 100])
    stop = threading.Event()

    def feed():  # healthy one-second windows at the current weights, as the stream worker writes them
        rng = np.random.default_rng(1)
        with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute("SELECT weights FROM allocations WHERE experiment_id = %s ORDER BY version DESC "
                                   "LIMIT 1", (config.experiment_id,)).fetchone()
                if row:
                    second = datetime.now(timezone.utc).replace(microsecond=0)
                    units, hists = stage_units(rng, *split(2_000, row[0]["Canary"]))
                    add_window(conn, config.experiment_id, second, units, hists)
                    conn.execute("SELECT pg_notify('abflow_aggregates', %s)", (config.experiment_id,))
                stop.wait(0.25)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()

    def stage_now(conn):
        row = conn.execute("SELECT state, stage FROM rollouts WHERE experiment_id = %s",
                           (config.experiment_id,)).fetchone()
        return row or ("not started", -1)

    try:
        with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
            first = services("refresher", name="refresher-a")
            wait_until(lambda: stage_now(conn)[1] >= 2, 90, message="stage 3 reached", workers=[first])
            first.kill()
            _, stage_at_kill = stage_now(conn)
            second = services("refresher", name="refresher-b")
            wait_until(lambda: stage_now(conn)[0] == "completed", 120, message="rollout completed", workers=[second])
            status = rollout_controller.status(conn, config.experiment_id)
    finally:
        stop.set()
        feeder.join(5)
    moves = [(t["action"], t["to_stage"]) for t in status["transitions"]]
    # One start, then every stage once, in order: the second controller went on from where the first stopped.
    assert moves == [("start", 0)] + [("advance", k) for k in range(1, 6)], moves
    assert 2 <= stage_at_kill < 5
    phases = [w["phase"] for w in reversed(allocation_history(
        engine, config.experiment_id, 20))]
    assert phases == ["rollout 5%", "rollout 10%", "rollout 25%", "rollout 50%", "rollout 75%", "rollout complete"]
