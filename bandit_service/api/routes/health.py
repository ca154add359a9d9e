"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import psycopg
from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import PoolTimeout

from bandit_service.api.deps import State, metrics_access
from bandit_service.api.errors import first_line
from bandit_service.api.models import HealthOut
from storage.queries import ping as database_ping
from storage.queries import refresh_lags

router = APIRouter(tags=["health"])


@router.get("/ping")
def ping() -> dict[str, str]:
    """No I/O at all: the floor any endpoint's latency is measured against."""
    return {}


HEALTH_WAIT_SECONDS = 0.5  # per dependency: /healthz answers within about a second


@router.get("/healthz", responses={503: {"model": HealthOut, "description": "A dependency is down; it says which"}})
def healthz(state: State, response: Response) -> HealthOut:
    """Whether PostgreSQL and Kafka answer, each within half a second; 503 naming what is down."""
    checks = {"postgresql": _postgresql(state), "kafka": _kafka(state)}
    down = {name: problem for name, problem in checks.items() if problem != "ok"}
    if down:
        response.status_code = 503
        response.headers["Retry-After"] = "2"
    return HealthOut(status="down" if down else "ok", checks=checks)


def _postgresql(state) -> str:
    try:
        with state.pool.connection(timeout=HEALTH_WAIT_SECONDS) as conn:
            database_ping(conn)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        return f"down: {first_line(exc)}"
    return "ok"


def _kafka(state) -> str:
    problem = state.publisher.broker_problem(HEALTH_WAIT_SECONDS)
    return "ok" if problem is None else f"down: {problem[:200]}"


@router.get("/metrics", response_class=Response, dependencies=[Depends(metrics_access)],
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
def prometheus(state: State) -> Response:
    with state.pool.connection() as conn:
        lags = refresh_lags(conn)
    for experiment_id, lag in lags.items():
        state.metrics.refresh_lag.labels(experiment_id).set(lag)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
