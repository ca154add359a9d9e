"""What operators watch, against the real thing: the alert rules pass `promtool check` and their unit
tests, and a real Prometheus scraping a running worker and API answers every query of every
dashboard panel and every alert with data."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from abflow.core.config import parse_config
from abflow.local.stack import free_port, wait_for_port
from producers.publisher import Publisher, ensure_topics
from storage.registry import create_experiment
from tests.conftest import wait_until
from tests.helpers import conversion, counted_events, invocation, now, publish

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "abflow-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "abflow-dashboard.json"
# The CI installs Debian's prometheus (with promtool) and sets this, so a missing binary fails there.
REQUIRED = os.environ.get("ABFLOW_REQUIRE_PROMETHEUS") == "1"


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if REQUIRED:
            pytest.fail(f"{name} is not installed (Debian: apt-get install prometheus)")
        pytest.skip(f"{name} is not installed (Debian: apt-get install prometheus)")
    return found


def test_the_alert_rules_are_valid_and_their_unit_tests_pass():
    promtool = binary("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0 and "SUCCESS: 8 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "abflow-alerts.test.yml"], capture_output=True, text=True,
                            cwd=RULES.parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target, with its variables as Grafana fills them."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"].replace("$experiment_id", ".*").replace("$__rate_interval", "1m"))
            for panel in dashboard["panels"] for target in panel["targets"]]


def alert_queries() -> list[tuple[str, str]]:
    """(alert, its expression without the threshold): what must return data for the alert to be able to fire."""
    import yaml

    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    threshold = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.e+-]+\s*$")
    return [(rule["alert"], threshold.sub("", rule["expr"].strip())) for rule in rules]


def test_a_real_prometheus_answers_every_panel_and_alert(settings, engine, run_env, services, tmp_path):
    prometheus_binary = binary("prometheus")
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    suffix = f"{random.randrange(1 << 30):x}"
    ab, canary = f"obs-ab-{suffix}", f"obs-canary-{suffix}"
    create_experiment(engine, parse_config({
        "experiment_id": ab, "strategy": "WeightedSampling",
        "variants": [{"name": "A", "role": "champion"}, {"name": "B", "role": "challenger"}]}))
    create_experiment(engine, parse_config({
        "experiment_id": canary, "strategy": "WeightedSampling",
        "variants": [{"name": "v1", "role": "champion"}, {"name": "v2", "role": "challenger"}],
        "rollout": {"min_duration_seconds": 600, "min_sample": 100}}))

    worker_port, api_port, prometheus_port = free_port(), free_port(), free_port()
    run_env["ABFLOW_WORKER_METRICS_PORT"] = str(worker_port)
    worker = services("worker")
    api = services("serve", "--port", str(api_port), name="serve")
    wait_for_port(api_port, 60, api.process, "the API")
    wait_for_port(worker_port, 60, worker.process, "the worker's metrics")

    rng = random.Random(5)
    events = 0
    with Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
        for experiment_id, variants in ((ab, ("A", "B")), (canary, ("v1", "v2"))):
            for u in range(1500):
                user, variant = f"user-{u}", variants[u % 2 if experiment_id == ab else int(u % 20 == 0)]
                for _ in range(2):
                    publish(publisher, "invocation", invocation(experiment_id, variant, now(), user,
                                                                latency_ms=rng.uniform(5, 80), error=rng.random() < 0.02))
                    events += 1
                if rng.random() < 0.1:
                    publish(publisher, "conversion", conversion(experiment_id, variant, now(), user))
                    events += 1
        for _ in range(20):  # dead letters: a variant the experiment does not have
            publish(publisher, "invocation", invocation(ab, "C", now(), "user-x"))
        publisher.flush(30)
    wait_until(lambda: counted_events(engine, [ab, canary]) == events, 90,
               message="every event counted", workers=[worker])

    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "abflow-api", "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]},
                           {"job_name": "abflow-worker",
                            "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]}]}))
    log = open(tmp_path / "prometheus.log", "w")
    prometheus = subprocess.Popen([prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path}/tsdb",
                                   f"--web.listen-address=127.0.0.1:{prometheus_port}"], stdout=log, stderr=log)
    try:
        wait_for_port(prometheus_port, 60, prometheus, "Prometheus")

        def answer(query: str) -> list:
            url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
            assert body["status"] == "success", body
            return body["data"]["result"]

        # Rates need two scrapes of a counter that moved: keep some traffic flowing meanwhile.
        with Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
            deadline = time.monotonic() + 90
            missing = panel_queries() + alert_queries()
            while missing and time.monotonic() < deadline:
                for experiment_id, variant in ((ab, "A"), (ab, "B"), (canary, "v1"), (ab, "C")):
                    publish(publisher, "invocation", invocation(experiment_id, variant, now(), f"user-{rng.randrange(99)}",
                                                                latency_ms=20.0))
                publisher.flush(10)
                time.sleep(1)
                missing = [(name, query) for name, query in missing if not answer(query)]
        assert not missing, f"no data for: {missing}"
        with urllib.request.urlopen(f"http://127.0.0.1:{prometheus_port}/api/v1/rules", timeout=10) as response:
            rules = json.loads(response.read())["data"]["groups"][0]["rules"]
        assert len(rules) == 8 and all(rule["health"] == "ok" for rule in rules), rules
        # What the figures say, checked against what happened.
        stage = answer(f'abflow_rollout_stage_percent{{experiment_id="{canary}"}}')
        assert [float(s["value"][1]) for s in stage] == [5.0]
        dead = answer('sum(abflow_worker_dead_letters_total{reason="unknown_variant"})')
        assert float(dead[0]["value"][1]) >= 20
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        log.close()

