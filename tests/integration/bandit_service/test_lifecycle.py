"""Champion / challenger lifecycle: promotion needs evidence, creates the next version, keeps the history."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from fastapi.testclient import TestClient

from abflow.core.config import parse_config
from bandit_service.api import create_app
from bandit_service.lifecycle import PromotionRefused, champion_history, next_version_config
from producers.publisher import ensure_topics
from storage.registry import create_experiment, get_experiment
from tests.conftest import ADMIN
from tests.helpers import Assigner
from tests.integration.bandit_service.test_refresher import topic_records
from tests.integration.bandit_service.test_report import fixed_split


def config(experiment_id: str, **extra) -> dict:
    return {"experiment_id": experiment_id, "strategy": "WeightedSampling", "analysis": {"mde": 0.2},
            "variants": [{"name": "Champion", "model_version": "1.0", "initial_weight": 0.5},
                         {"name": "Challenger", "model_version": "2.0", "initial_weight": 0.5}], **extra}


def three_variants(experiment_id: str, **extra) -> dict:
    return config(experiment_id, variants=config(experiment_id)["variants"]
                  + [{"name": "Other", "model_version": "2.1", "initial_weight": 0.5}], **extra)


def run_cli(run_env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "abflow.cli", *args], env=run_env, capture_output=True, text=True,
                          timeout=120)


def test_next_version_config():
    current = parse_config({**three_variants("demo"), "layer": "ranking", "traffic": 0.5, "shadows": [{"name": "v3"}]})
    after = next_version_config(current, "Challenger", "demo-v2", {"New": "3.0"})
    assert [(v.name, v.role, v.model_version, v.initial_weight) for v in after.variants] == [
        ("Challenger", "champion", "2.0", pytest.approx(1 / 3)), ("Other", "challenger", "2.1", pytest.approx(1 / 3)),
        ("New", "challenger", "3.0", pytest.approx(1 / 3))]
    assert after.experiment_id == "demo-v2" and after.rollout is None
    assert (after.layer, after.traffic, [s.name for s in after.shadows]) == ("ranking", 0.5, ["v3"])
    assert next_version_config(parse_config(config("x")), "Challenger", "x-v2", {}) is None  # the winner alone

    # A canary's next version is a canary of its one new challenger, from the plan's first stage.
    canary = parse_config(config("canary", rollout={"challenger": "Challenger", "stages": [2, 20, 100],
                                                     "min_sample": 500}))
    after = next_version_config(canary, "Challenger", "canary-v2", {"Next": "3.0"})
    assert [(v.name, v.role, v.initial_weight) for v in after.variants] == [
        ("Challenger", "champion", pytest.approx(0.98)), ("Next", "challenger", pytest.approx(0.02))]
    assert (after.rollout.challenger, after.rollout.stages, after.rollout.min_sample) == ("Next", (2, 20, 100), 500)
    plain = next_version_config(canary, "Challenger", "canary-v2", {"Next": "3.0"}, keep_rollout=False)
    assert plain.rollout is None and plain.variants[1].initial_weight == pytest.approx(0.5)
    with pytest.raises(PromotionRefused, match="takes one challenger, but the next version would have 2"):
        next_version_config(canary, "Challenger", "canary-v2", {"Next": "3.0", "Other": "3.1"})


def test_promotion_with_evidence_creates_the_next_version(engine, run_env, settings, stack):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = f"life-{uuid.uuid4().hex[:8]}"
    layer = f"ranking-{uuid.uuid4().hex[:6]}"
    create_experiment(engine, parse_config(config(experiment_id, layer=layer, traffic=0.5)))
    first_range = (get_experiment(engine, experiment_id).layer_start, get_experiment(engine, experiment_id).layer_end)

    # No evidence yet: refused, and nothing changed.
    refused = run_cli(run_env, "experiment", "promote", experiment_id, "Challenger")
    assert refused.returncode == 1 and "no evidence that 'Challenger' won" in refused.stderr
    assert run_cli(run_env, "experiment", "promote", experiment_id, "Champion").stderr.count("is not a challenger") == 1
    assert get_experiment(engine, experiment_id).status == "running"

    fixed_split(engine, experiment_id, rates=(0.05, 0.065))  # Champion vs Challenger: a clear win
    done = run_cli(run_env, "experiment", "promote", experiment_id, "Challenger", "--challenger", "Next=3.0",
                   "--reason", "won on conversions", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    next_id = f"{experiment_id}-v2"
    assert result["next_experiment_id"] == next_id and result["evidence"]["source"] == "decision"
    assert result["evidence"]["verdict"] == "ship" and result["next_variants"] == ["Challenger", "Next"]

    old, new = get_experiment(engine, experiment_id), get_experiment(engine, next_id)
    assert (old.status, old.winner) == ("stopped", "Challenger")
    assert (new.status, new.lineage, new.version, new.layer) == ("running", experiment_id, 2, layer)
    assert (new.layer_start, new.layer_end) == first_range  # the same units stay in the lineage
    assert [(v.name, v.role) for v in new.variants] == [("Challenger", "champion"), ("Next", "challenger")]
    # The promoted experiment serves the winner to every unit inside its share, on both serving paths.
    with Assigner(settings.database_url) as assigned:
        served = [assigned(experiment_id, f"user-{i}") for i in range(200)]
    assert {a.variant for a in served} == {"Challenger"}
    records = topic_records(settings.kafka_bootstrap, settings.topics.allocations, experiment_id, 1)
    assert records[-1]["weights"] == {"Champion": 0.0, "Challenger": 1.0}
    assert records[-1]["phase"] == "promoted" and records[-1]["champion"] == "Challenger"

    # Promoting twice is refused; the history is queryable from either version.
    again = run_cli(run_env, "experiment", "promote", experiment_id, "Champion", "--force", "--reason", "again")
    assert again.returncode == 1 and "already promoted 'Challenger'" in again.stderr
    history = champion_history(engine, experiment_id)
    assert [(c["version"], c["variant"], c["model_version"], c["experiment_id"], c["promoted_from"]) for c in history] \
        == [(1, "Champion", "1.0", experiment_id, None), (2, "Challenger", "2.0", next_id, experiment_id)]
    assert history[1]["reason"] == "won on conversions" and history[1]["evidence"]["source"] == "decision"
    listing = run_cli(run_env, "experiment", "champions", next_id)
    assert listing.returncode == 0 and "Challenger" in listing.stdout and "won on conversions" in listing.stdout

    # The API: a forced promotion (the reason is kept), its 409s, and the history.
    with TestClient(create_app(settings)) as client:
        auth = ADMIN
        assert client.post(f"/experiments/{next_id}/promote", json={"variant": "Next"}).status_code == 401
        refused = client.post(f"/experiments/{next_id}/promote", json={"variant": "Next"}, headers=auth)
        assert refused.status_code == 409 and "no evidence" in refused.json()["detail"]
        forced = client.post(f"/experiments/{next_id}/promote", headers=auth,
                             json={"variant": "Next", "force": True, "reason": "hotfix",
                                   "challengers": {"Later": "4.0"}})
        assert forced.status_code == 200, forced.text
        assert forced.json()["next_experiment_id"] == f"{experiment_id}-v3"
        assert forced.json()["next_variants"] == ["Next", "Later"]
        assert forced.json()["evidence"] == {"source": "forced"}
        assert client.post("/experiments/nope/promote", json={"variant": "x"}, headers=auth).status_code == 404
        champions = client.get(f"/experiments/{experiment_id}/champions", headers=auth).json()
    assert [c["variant"] for c in champions] == ["Champion", "Challenger", "Next"]
    assert champions[2]["reason"] == "hotfix" and champions[2]["actor"] == "api"
