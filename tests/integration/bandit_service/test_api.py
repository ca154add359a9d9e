"""The HTTP API against the real PostgreSQL and broker: validation, auth, 404s, assignment, events, stats, weights."""

from __future__ import annotations

import time
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from bandit_service.api import create_app
from producers.publisher import ensure_topics
from tests.conftest import ADMIN, API_KEYS, wait_until
from tests.helpers import counted_events

AUTH = ADMIN


@pytest.fixture
def client(settings):
    """A client that sends no key unless a request names one."""
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def admin(client):
    """The same app, every request with the admin key."""
    client.headers.update(AUTH)
    return client


def config(experiment_id: str, **extra) -> dict:
    return {"experiment_id": experiment_id, "strategy": "ThompsonSampling", "warmup": 10,
            "variants": [{"name": "Champion", "role": "champion", "initial_weight": 0.5},
                         {"name": "Challenger", "role": "challenger", "initial_weight": 0.5}], **extra}


def new_id() -> str:
    return f"api-{uuid.uuid4().hex[:8]}"


# Who may call each operation of the OpenAPI schema: None is open to anyone; admin keys may call
# everything else. A new route without an entry here fails the test below.
ROLES_OF = {
    ("GET", "/ping"): None, ("GET", "/healthz"): None, ("GET", "/metrics"): None,
    ("POST", "/experiments"): {"admin"},
    ("GET", "/experiments"): {"read", "admin"},
    ("GET", "/experiments/{experiment_id}"): {"read", "admin"},
    ("POST", "/experiments/{experiment_id}/pause"): {"admin"},
    ("POST", "/experiments/{experiment_id}/resume"): {"admin"},
    ("POST", "/experiments/{experiment_id}/stop"): {"admin"},
    ("GET", "/experiments/{experiment_id}/stats"): {"read", "admin"},
    ("GET", "/experiments/{experiment_id}/report"): {"read", "admin"},
    ("GET", "/experiments/{experiment_id}/weights"): {"serving", "read", "admin"},
    ("GET", "/experiments/{experiment_id}/weights/history"): {"read", "admin"},
    ("POST", "/experiments/{experiment_id}/promote"): {"admin"},
    ("GET", "/experiments/{experiment_id}/champions"): {"read", "admin"},
    ("GET", "/experiments/{experiment_id}/rollout"): {"read", "admin"},
    ("POST", "/experiments/{experiment_id}/rollout/{action}"): {"admin"},
    ("POST", "/experiments/{experiment_id}/assign"): {"serving", "admin"},
    ("POST", "/experiments/{experiment_id}/invocations"): {"serving", "admin"},
    ("POST", "/experiments/{experiment_id}/conversions"): {"serving", "admin"},
}


def test_every_route_answers_each_role_as_the_table_says(client):
    """No key and an unknown key: 401; a key of a role the route does not allow: 403; an allowed key
    gets past authentication (whatever the route then says about the dummy request)."""
    experiment_id = new_id()
    client.post("/experiments", json=config(experiment_id), headers=AUTH)
    operations = {(method.upper(), path) for path, item in client.get("/openapi.json").json()["paths"].items()
                  for method in item}
    assert operations == set(ROLES_OF), (sorted(operations - set(ROLES_OF)), sorted(set(ROLES_OF) - operations))
    for (method, path), allowed in sorted(ROLES_OF.items()):
        url = path.format(experiment_id=experiment_id, action="pause")
        keys = {"no key": None, "unknown key": "not-a-key", **API_KEYS}
        for who, key in keys.items():
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            status = client.request(method, url, headers=headers, json={}).status_code
            if allowed is None or who in allowed:
                assert status not in (401, 403), (method, path, who, status)
            elif who in ("no key", "unknown key"):
                assert status == 401, (method, path, who, status)
            else:
                assert status == 403, (method, path, who, status)


def test_keys_rotate_and_errors_say_what_is_wrong(settings, monkeypatch):
    monkeypatch.setenv("ABFLOW_API_KEYS_SERVING", "old-serving-key, new-serving-key")
    from abflow.settings import Settings

    with TestClient(create_app(Settings.from_env())) as rotating:
        for key in ("old-serving-key", "new-serving-key"):
            response = rotating.get("/experiments/nope/weights", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 404, key  # past authentication: there is no such experiment
        missing = rotating.get("/experiments")
        assert missing.status_code == 401 and "missing API key" in missing.json()["detail"]
        assert missing.headers["www-authenticate"] == "Bearer"
        refused = rotating.get("/experiments", headers={"Authorization": "Bearer new-serving-key"})
        assert refused.status_code == 403 and "needs a key of role read or admin" in refused.json()["detail"]


def test_metrics_can_be_put_behind_the_read_role(settings, monkeypatch):
    monkeypatch.setenv("ABFLOW_METRICS_PUBLIC", "0")
    from abflow.settings import Settings

    with TestClient(create_app(Settings.from_env())) as private:
        assert private.get("/metrics").status_code == 401
        assert private.get("/metrics", headers={"Authorization": f"Bearer {API_KEYS['read']}"}).status_code == 200
        assert private.get("/healthz").status_code == 200


def test_bodies_over_the_limit_are_413(client):
    big = {"experiment_id": new_id(), "description": "x" * (300 * 1024)}
    response = client.post("/experiments", json=big, headers=AUTH)
    assert response.status_code == 413 and "ABFLOW_API_MAX_BODY_BYTES" in response.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(300):
            yield b"x" * 1024

    chunked = client.post("/experiments", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert chunked.status_code == 413
    small = client.post("/experiments", content=iter([b'{"experiment_id": 1}']),
                        headers={**AUTH, "Content-Type": "application/json"})
    assert small.status_code == 422  # under the limit, a chunked body is read as usual


def test_create_list_show_and_lifecycle(admin):
    experiment_id = new_id()
    created = admin.post("/experiments", json=config(experiment_id, min_weight=0.05), headers=AUTH).json()
    assert created["status"] == "running" and created["min_weight"] == 0.05
    assert [v["name"] for v in created["variants"]] == ["Champion", "Challenger"]
    assert experiment_id in [e["experiment_id"] for e in admin.get("/experiments").json()]
    assert admin.post("/experiments", json=config(experiment_id), headers=AUTH).status_code == 409
    assert admin.post(f"/experiments/{experiment_id}/resume", headers=AUTH).status_code == 409  # not paused
    assert admin.post(f"/experiments/{experiment_id}/pause", headers=AUTH).json()["status"] == "paused"
    assert admin.post(f"/experiments/{experiment_id}/resume", headers=AUTH).json()["status"] == "running"
    assert admin.post(f"/experiments/{experiment_id}/stop", headers=AUTH).json()["status"] == "stopped"
    assert admin.post(f"/experiments/{experiment_id}/resume", headers=AUTH).status_code == 409


def test_bad_requests_name_the_field(admin):
    bad = admin.post("/experiments", json=config(new_id(), epsilon=3), headers=AUTH)
    assert bad.status_code == 422 and "epsilon must be in [0, 1]" in bad.json()["detail"]
    experiment_id = new_id()
    admin.post("/experiments", json=config(experiment_id), headers=AUTH)
    no_unit = admin.post(f"/experiments/{experiment_id}/assign", json={}, headers=AUTH)
    assert no_unit.status_code == 422 and no_unit.json()["detail"][0]["loc"] == ["body", "unit_id"]
    wrong_variant = admin.post(f"/experiments/{experiment_id}/invocations", headers=AUTH,
                                json={"variant": "Nope", "user_id": "u"})
    assert wrong_variant.status_code == 422 and wrong_variant.json()["detail"]["field"] == "variant"
    negative = admin.post(f"/experiments/{experiment_id}/invocations", headers=AUTH,
                           json={"variant": "Champion", "user_id": "u", "latency_ms": -5})
    assert negative.status_code == 422 and "'latency_ms' must be >= 0" in negative.json()["detail"]["message"]
    bad_time = admin.post(f"/experiments/{experiment_id}/conversions", headers=AUTH,
                           json={"variant": "Champion", "user_id": "u", "timestamp": "yesterday"})
    assert bad_time.status_code == 422 and bad_time.json()["detail"]["reason"] == "invalid_value"
    typo = admin.post(f"/experiments/{experiment_id}/conversions", headers=AUTH,
                      json={"variant": "Champion", "user_id": "u", "rewrad": 3.0})
    assert typo.status_code == 422 and typo.json()["detail"][0]["loc"] == ["body", "rewrad"]
    bad_name = admin.post(f"/experiments/{experiment_id}/conversions", headers=AUTH,
                          json={"variant": "Champion", "user_id": "u", "values": {"Revenue": 3.0}})
    assert bad_name.status_code == 422 and "Revenue" in bad_name.json()["detail"]["message"]
    # Found by the fuzzer: a body that is not UTF-8 was a bare, undocumented 400.
    garbled = admin.post(f"/experiments/{experiment_id}/assign", content=b"\xff\x04",
                         headers={**AUTH, "Content-Type": "application/json"})
    assert garbled.status_code == 422 and "not JSON" in garbled.json()["detail"]
    not_json = admin.post(f"/experiments/{experiment_id}/assign", content=b"{unit_id",
                          headers={**AUTH, "Content-Type": "application/json"})
    assert not_json.status_code == 422


def test_events_the_stream_would_refuse_are_refused_at_the_door(admin):
    """The API applies the stream's own checks: a number out of the contract's bounds (1e308 once
    overflowed PostgreSQL's sums and stopped the worker) and a time the worker would dead-letter."""
    experiment_id = new_id()
    admin.post("/experiments", json=config(experiment_id))
    body = {"variant": "Champion", "user_id": "u"}
    for path, extra, field, reason in [
        ("conversions", {"reward": 1e308}, "reward", "out_of_range"),
        ("conversions", {"values": {"revenue": -2e12}}, "values.revenue", "out_of_range"),
        ("invocations", {"latency_ms": 1e308}, "latency_ms", "out_of_range"),
        ("invocations", {"propensity": 2.0}, "propensity", "invalid_value"),
        ("invocations", {"timestamp": "2100-01-01T00:00:00Z"}, "timestamp", "timestamp_in_future"),
        ("conversions", {"timestamp": 1_000_000_000}, "timestamp", "too_late"),
    ]:
        answer = admin.post(f"/experiments/{experiment_id}/{path}", json={**body, **extra})
        assert answer.status_code == 422, (extra, answer.text)
        assert (answer.json()["detail"]["field"], answer.json()["detail"]["reason"]) == (field, reason), answer.text
    assert admin.post(f"/experiments/{experiment_id}/conversions", json={**body, "reward": 1e12}).status_code == 202


def test_inputs_that_were_500s_are_422s_naming_the_field(admin):
    experiment_id = new_id()
    assert admin.post("/experiments", json=config(experiment_id)).status_code == 201
    for raw in (b'{"unit_id": "a\\u0000b"}', b'{"unit_id": "\\ud800"}', b'{"unit_id": "user-1\\n"}'):
        answer = admin.post(f"/experiments/{experiment_id}/assign", content=raw,
                            headers={"Content-Type": "application/json"})
        assert answer.status_code == 422, (raw, answer.text)
        assert answer.json()["detail"][0]["loc"] == ["body", "unit_id"], answer.text
    variants = config(new_id())["variants"]
    for changes, field in [
        ({"description": "a\u0000b"}, "description"),
        ({"warmup": 2**31}, "warmup"),
        ({"variants": [{**variants[0], "model_version": "v" * 257}, variants[1]]}, "variants[0].model_version"),
        ({"experiment_id": "x" * 127 + "\n"}, "experiment_id"),
        ({"variants": [{**variants[0], "initial_weight": 1e308}, {**variants[1], "initial_weight": 1e308}]},
         "variants[0].initial_weight"),
        ({"variants": [{"name": f"v{i}"} for i in range(51)]}, "variants"),
    ]:
        answer = admin.post("/experiments", json={**config(new_id()), **changes})
        assert answer.status_code == 422 and field in answer.json()["detail"], (changes, answer.text)
    # strategy is optional in the API as in a config file.
    created = admin.post("/experiments", json={k: v for k, v in config(new_id()).items() if k != "strategy"})
    assert created.status_code == 201 and created.json()["strategy"] == "WeightedSampling", created.text


def test_null_in_the_config_means_the_default(admin):
    """Found by the fuzzer: "epsilon": null was refused as "must be a number, got None"."""
    created = admin.post("/experiments", json=config(new_id(), epsilon=None, layer=None, analysis=None))
    assert created.status_code == 201, created.text
    assert created.json()["epsilon"] == 0.1


def test_unknown_experiment_is_404(admin):
    for method, path in [("get", "/experiments/nope"), ("get", "/experiments/nope/stats"),
                         ("get", "/experiments/nope/weights"), ("get", "/experiments/nope/weights/history"),
                         ("post", "/experiments/nope/pause")]:
        assert getattr(admin, method)(path, headers=AUTH).status_code == 404, path
    assert admin.post("/experiments/nope/assign", json={"unit_id": "u"}, headers=AUTH).status_code == 404
    assert admin.post("/experiments/nope/invocations", json={"variant": "A", "user_id": "u"},
                       headers=AUTH).status_code == 404


def test_assign_is_sticky_and_events_reach_the_aggregates(admin, settings, engine, workers):
    experiment_id = new_id()
    admin.post("/experiments", json=config(experiment_id), headers=AUTH)
    first = admin.post(f"/experiments/{experiment_id}/assign", json={"unit_id": "user-9"}, headers=AUTH).json()
    again = admin.post(f"/experiments/{experiment_id}/assign", json={"unit_id": "user-9"}, headers=AUTH).json()
    assert first["new"] and not again["new"]
    assert (again["variant"], again["propensity"]) == (first["variant"], 0.5)

    worker = workers()
    for i in range(20):
        response = admin.post(f"/experiments/{experiment_id}/invocations", headers=AUTH,
                               json={"variant": "Challenger", "user_id": f"u{i}", "latency_ms": 20, "propensity": 0.5})
        assert response.status_code == 202
    accepted = admin.post(f"/experiments/{experiment_id}/conversions", headers=AUTH,
                           json={"variant": "Challenger", "user_id": "u1", "reward": 4.0, "event_id": "conv-1"})
    assert accepted.json() == {"event_id": "conv-1", "accepted": True}
    admin.post(f"/experiments/{experiment_id}/conversions", headers=AUTH,  # a retry: counted once
                json={"variant": "Challenger", "user_id": "u1", "reward": 4.0, "event_id": "conv-1"})
    labelled = admin.post(f"/experiments/{experiment_id}/conversions", headers=AUTH,
                          json={"variant": "Challenger", "user_id": "u2", "values": {"revenue": 31.5, "correct": 1}})
    assert labelled.status_code == 202
    wait_until(lambda: counted_events(engine, [experiment_id]) == 22, 60, message="API events aggregated",
               workers=[worker])
    with engine.connect() as conn:  # the values reached the unit they belong to
        sums = conn.execute(text("SELECT value_sums FROM unit_state WHERE experiment_id = :e AND unit_id = 'u2'"),
                            {"e": experiment_id}).scalar_one()
    assert sums == {"revenue": 31.5, "correct": 1.0}
    stats = {v["variant"]: v for v in admin.get(f"/experiments/{experiment_id}/stats").json()["variants"]}
    assert stats["Challenger"]["invocations"] == 20 and stats["Challenger"]["conversions"] == 2
    assert stats["Challenger"]["reward_per_invocation"] == pytest.approx(0.25)
    assert stats["Champion"]["invocations"] == 0 and stats["Champion"]["conversion_rate"] is None


def test_weights_endpoints_and_metrics(admin):
    experiment_id = new_id()
    admin.post("/experiments", json=config(experiment_id), headers=AUTH)
    current = admin.get(f"/experiments/{experiment_id}/weights").json()
    assert current == {"experiment_id": experiment_id, "version": None,
                       "weights": {"Champion": 0.5, "Challenger": 0.5}}  # before the refresher's first version
    assert admin.get(f"/experiments/{experiment_id}/weights/history").json() == []
    assert admin.get(f"/experiments/{experiment_id}/weights/history?limit=0").status_code == 422
    admin.post(f"/experiments/{experiment_id}/assign", json={"unit_id": "m1"}, headers=AUTH)
    assert admin.get("/healthz").json() == {"status": "ok", "checks": {"postgresql": "ok", "kafka": "ok"}}
    text = admin.get("/metrics").text
    assert f'abflow_assignments_total{{experiment_id="{experiment_id}",new="true"' in text
    assert 'abflow_http_requests_total{method="POST",route="/experiments/{experiment_id}/assign",status="200"}' in text
    assert "abflow_refresh_lag_seconds" in text


def test_openapi_schema_lists_the_endpoints(admin):
    paths = admin.get("/openapi.json").json()["paths"]
    for path in ["/experiments", "/experiments/{experiment_id}/assign", "/experiments/{experiment_id}/invocations",
                 "/experiments/{experiment_id}/conversions", "/experiments/{experiment_id}/stats",
                 "/experiments/{experiment_id}/weights", "/experiments/{experiment_id}/weights/history",
                 "/healthz", "/metrics"]:
        assert path in paths, path


def test_postgresql_down_is_a_fast_503_and_events_still_reach_kafka(stack, settings, engine, workers):
    """PostgreSQL stopped under a running API: every request that needs it answers 503 with a JSON
    body and Retry-After within the pool's wait (2 s), /healthz names the dependency within about a
    second, events of known experiments are still accepted (Kafka is up), and everything recovers
    without a restart."""
    if stack.postgres is None:
        pytest.skip("needs the embedded PostgreSQL, which the test can stop and start")
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = new_id()
    with TestClient(create_app(settings)) as client:
        client.headers.update(AUTH)
        assert client.post("/experiments", json=config(experiment_id)).status_code == 201
        event = {"variant": "Champion", "user_id": "u-outage"}
        assert client.post(f"/experiments/{experiment_id}/invocations", json=event).status_code == 202
        stack.postgres.stop()
        try:
            timings = {}
            for name, call in [
                ("assign", lambda: client.post(f"/experiments/{experiment_id}/assign", json={"unit_id": "u1"})),
                ("experiment", lambda: client.get(f"/experiments/{experiment_id}")),
                ("weights", lambda: client.get(f"/experiments/{experiment_id}/weights")),
            ]:
                started = time.monotonic()
                answer = call()
                timings[name] = time.monotonic() - started
                assert answer.status_code == 503, (name, answer.status_code, answer.text)
                assert answer.headers["Retry-After"] == "2" and answer.json()["dependency"] == "postgresql", answer.text
            assert max(timings.values()) < 3.0, timings  # the pool's 2 s wait, and no more
            started = time.monotonic()
            health = client.get("/healthz")
            health_seconds = time.monotonic() - started
            assert health.status_code == 503 and health_seconds < 1.5, (health_seconds, health.text)
            assert health.json()["checks"]["postgresql"].startswith("down") and health.json()["checks"]["kafka"] == "ok"
            accepted = client.post(f"/experiments/{experiment_id}/invocations",
                                   json={**event, "event_id": "during-outage"})
            assert accepted.status_code == 202, accepted.text
            unknown = client.post(f"/experiments/{new_id()}/invocations", json=event)
            assert unknown.status_code == 503, unknown.text
        finally:
            stack.postgres.start()
        engine.dispose()
        wait_until(lambda: client.get("/healthz").status_code == 200, 30, message="healthy again")
        # A client that retries after Retry-After gets through: the pools drop the dead connections.
        wait_until(lambda: client.post(f"/experiments/{experiment_id}/assign", json={"unit_id": "u1"}).status_code
                   == 200, 10, interval=1.0, message="assign answers again")
        assert client.get(f"/experiments/{experiment_id}").status_code == 200
        worker = workers()  # the event accepted during the outage was published and counts
        wait_until(lambda: counted_events(engine, [experiment_id]) == 2, 60, message="both events", workers=[worker])


def test_a_500_leaves_the_keep_alive_connection_usable(settings):
    """Behind a real uvicorn: an error no handler expects answers a JSON 500, and the client's next
    request on the same connection is answered (the server used to close it, and that request was reset)."""
    import http.client
    import threading

    import uvicorn

    from abflow.local.stack import free_port

    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    app = create_app(settings)

    def broken() -> dict:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, message="uvicorn started")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/broken")
        failed = connection.getresponse()
        assert failed.status == 500 and "internal error" in failed.read().decode()
        connection.request("GET", "/ping")  # the same connection
        again = connection.getresponse()
        assert again.status == 200 and again.read() == b"{}"
        connection.close()
    finally:
        server.should_exit = True
        thread.join(10)
