"""The HTTP API against the real PostgreSQL and broker: validation, auth, 404s, assignment, events, stats, weights."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from bandit_service.api import create_app
from producers.publisher import ensure_topics
from tests.conftest import wait_until
from tests.helpers import counted_events

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(settings):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    with TestClient(create_app(settings, TOKEN)) as test_client:
        yield test_client


def config(experiment_id: str, **extra) -> dict:
    return {"experiment_id": experiment_id, "strategy": "ThompsonSampling", "warmup": 10,
            "variants": [{"name": "Champion", "role": "champion", "initial_weight": 0.5},
                         {"name": "Challenger", "role": "challenger", "initial_weight": 0.5}], **extra}


def new_id() -> str:
    return f"api-{uuid.uuid4().hex[:8]}"


def test_state_changes_need_the_token(client):
    experiment_id = new_id()
    missing = client.post("/experiments", json=config(experiment_id))
    assert missing.status_code == 401 and "bearer token" in missing.json()["detail"]
    wrong = client.post("/experiments", json=config(experiment_id), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    assert client.post("/experiments", json=config(experiment_id), headers=AUTH).status_code == 201
    assert client.get(f"/experiments/{experiment_id}").status_code == 200  # reads are open
    for path in ("pause", "resume", "stop", "assign", "invocations", "conversions"):
        assert client.post(f"/experiments/{experiment_id}/{path}", json={}).status_code == 401, path


def test_create_list_show_and_lifecycle(client):
    experiment_id = new_id()
    created = client.post("/experiments", json=config(experiment_id, min_weight=0.05), headers=AUTH).json()
    assert created["status"] == "running" and created["min_weight"] == 0.05
    assert [v["name"] for v in created["variants"]] == ["Champion", "Challenger"]
    assert experiment_id in [e["experiment_id"] for e in client.get("/experiments").json()]
    assert client.post("/experiments", json=config(experiment_id), headers=AUTH).status_code == 409
    assert client.post(f"/experiments/{experiment_id}/resume", headers=AUTH).status_code == 409  # not paused
    assert client.post(f"/experiments/{experiment_id}/pause", headers=AUTH).json()["status"] == "paused"
    assert client.post(f"/experiments/{experiment_id}/resume", headers=AUTH).json()["status"] == "running"
    assert client.post(f"/experiments/{experiment_id}/stop", headers=AUTH).json()["status"] == "stopped"
    assert client.post(f"/experiments/{experiment_id}/resume", headers=AUTH).status_code == 409


def test_bad_requests_name_the_field(client):
    bad = client.post("/experiments", json=config(new_id(), epsilon=3), headers=AUTH)
    assert bad.status_code == 422 and "epsilon must be in [0, 1]" in bad.json()["detail"]
    experiment_id = new_id()
    client.post("/experiments", json=config(experiment_id), headers=AUTH)
    no_unit = client.post(f"/experiments/{experiment_id}/assign", json={}, headers=AUTH)
    assert no_unit.status_code == 422 and no_unit.json()["detail"][0]["loc"] == ["body", "unit_id"]
    wrong_variant = client.post(f"/experiments/{experiment_id}/invocations", headers=AUTH,
                                json={"variant": "Nope", "user_id": "u"})
    assert wrong_variant.status_code == 422 and wrong_variant.json()["detail"]["field"] == "variant"
    negative = client.post(f"/experiments/{experiment_id}/invocations", headers=AUTH,
                           json={"variant": "Champion", "user_id": "u", "latency_ms": -5})
    assert negative.status_code == 422 and "'latency_ms' must be >= 0" in negative.json()["detail"]["message"]
    bad_time = client.post(f"/experiments/{experiment_id}/conversions", headers=AUTH,
                           json={"variant": "Champion", "user_id": "u", "timestamp": "yesterday"})
    assert bad_time.status_code == 422 and bad_time.json()["detail"]["reason"] == "invalid_value"


def test_unknown_experiment_is_404(client):
    for method, path in [("get", "/experiments/nope"), ("get", "/experiments/nope/stats"),
                         ("get", "/experiments/nope/weights"), ("get", "/experiments/nope/weights/history"),
                         ("post", "/experiments/nope/pause")]:
        assert getattr(client, method)(path, headers=AUTH).status_code == 404, path
    assert client.post("/experiments/nope/assign", json={"unit_id": "u"}, headers=AUTH).status_code == 404
    assert client.post("/experiments/nope/invocations", json={"variant": "A", "user_id": "u"},
                       headers=AUTH).status_code == 404


def test_assign_is_sticky_and_events_reach_the_aggregates(client, settings, engine, workers):
    experiment_id = new_id()
    client.post("/experiments", json=config(experiment_id), headers=AUTH)
    first = client.post(f"/experiments/{experiment_id}/assign", json={"unit_id": "user-9"}, headers=AUTH).json()
    again = client.post(f"/experiments/{experiment_id}/assign", json={"unit_id": "user-9"}, headers=AUTH).json()
    assert first["new"] and not again["new"]
    assert (again["variant"], again["propensity"]) == (first["variant"], 0.5)

    worker = workers()
    for i in range(20):
        response = client.post(f"/experiments/{experiment_id}/invocations", headers=AUTH,
                               json={"variant": "Challenger", "user_id": f"u{i}", "latency_ms": 20, "propensity": 0.5})
        assert response.status_code == 202
    accepted = client.post(f"/experiments/{experiment_id}/conversions", headers=AUTH,
                           json={"variant": "Challenger", "user_id": "u1", "reward": 4.0, "event_id": "conv-1"})
    assert accepted.json() == {"event_id": "conv-1", "accepted": True}
    client.post(f"/experiments/{experiment_id}/conversions", headers=AUTH,  # a retry: counted once
                json={"variant": "Challenger", "user_id": "u1", "reward": 4.0, "event_id": "conv-1"})
    wait_until(lambda: counted_events(engine, [experiment_id]) == 21, 60, message="API events aggregated",
               workers=[worker])
    stats = {v["variant"]: v for v in client.get(f"/experiments/{experiment_id}/stats").json()["variants"]}
    assert stats["Challenger"]["invocations"] == 20 and stats["Challenger"]["conversions"] == 1
    assert stats["Challenger"]["reward_per_invocation"] == pytest.approx(0.2)
    assert stats["Champion"]["invocations"] == 0 and stats["Champion"]["conversion_rate"] is None


def test_weights_endpoints_and_metrics(client):
    experiment_id = new_id()
    client.post("/experiments", json=config(experiment_id), headers=AUTH)
    current = client.get(f"/experiments/{experiment_id}/weights").json()
    assert current == {"experiment_id": experiment_id, "version": None,
                       "weights": {"Champion": 0.5, "Challenger": 0.5}}  # before the refresher's first version
    assert client.get(f"/experiments/{experiment_id}/weights/history").json() == []
    assert client.get(f"/experiments/{experiment_id}/weights/history?limit=0").status_code == 422
    client.post(f"/experiments/{experiment_id}/assign", json={"unit_id": "m1"}, headers=AUTH)
    assert client.get("/healthz").json() == {"status": "ok"}
    text = client.get("/metrics").text
    assert f'abflow_assignments_total{{experiment_id="{experiment_id}",new="true"' in text
    assert 'abflow_http_requests_total{method="POST",route="/experiments/{experiment_id}/assign",status="200"}' in text
    assert "abflow_refresh_lag_seconds" in text


def test_openapi_schema_lists_the_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ["/experiments", "/experiments/{experiment_id}/assign", "/experiments/{experiment_id}/invocations",
                 "/experiments/{experiment_id}/conversions", "/experiments/{experiment_id}/stats",
                 "/experiments/{experiment_id}/weights", "/experiments/{experiment_id}/weights/history",
                 "/healthz", "/metrics"]:
        assert path in paths, path
