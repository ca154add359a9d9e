"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bandit_service.api.deps import State, metrics_access
from bandit_service.api.models import HealthOut
from storage.queries import ping as database_ping
from storage.queries import refresh_lags

router = APIRouter(tags=["health"])


@router.get("/ping")
def ping() -> dict[str, str]:
    """No I/O at all: the floor any endpoint's latency is measured against."""
    return {}


@router.get("/healthz")
def healthz(state: State) -> HealthOut:
    """PostgreSQL answers."""
    with state.pool.connection() as conn:
        database_ping(conn)
    return HealthOut(status="ok")


@router.get("/metrics", response_class=Response, dependencies=[Depends(metrics_access)],
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
def prometheus(state: State) -> Response:
    with state.pool.connection() as conn:
        lags = refresh_lags(conn)
    for experiment_id, lag in lags.items():
        state.metrics.refresh_lag.labels(experiment_id).set(lag)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
