"""The HTTP API (FastAPI): the app, its state and its middleware; the routes are in ``routes/``.

Every endpoint that changes state (creating or changing an experiment,
assigning a unit, publishing an event) requires ``Authorization: Bearer
<token>``; reads are open. Bad requests get a 4xx whose body names the field
and the problem; an unknown experiment is 404 (``errors``).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from psycopg_pool import ConnectionPool

from abflow.settings import Settings
from bandit_service.api.deps import ApiState
from bandit_service.api.errors import install_error_handlers
from bandit_service.api.metrics import ApiMetrics
from bandit_service.api.routes import experiments, health, rollouts, serving
from producers.publisher import Publisher
from storage.db import make_engine


def create_app(settings: Settings, token: str, publisher: Publisher | None = None) -> FastAPI:
    """The API over ``settings``' PostgreSQL and Kafka; state changes need ``token``."""
    if not token:
        raise ValueError("an API token is required (ABFLOW_API_TOKEN)")
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own_publisher = publisher is None
        state = ApiState(
            settings=settings, token=token, metrics=metrics,
            pool=ConnectionPool(settings.libpq_url, min_size=2, max_size=16, kwargs={"autocommit": True}, open=True),
            engine=make_engine(settings.require_database_url()),
            publisher=publisher or Publisher(settings.require_kafka_bootstrap(), settings.topics))
        app.state.abflow = state
        try:
            yield
        finally:
            state.pool.close()
            state.engine.dispose()
            if own_publisher:
                state.publisher.close()

    app = FastAPI(title="abflow", version="0.1.0", lifespan=lifespan,
                  description="A/B tests and multi-armed bandits between ML model variants.")

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = route.path if route is not None else "unmatched"
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - started)
        return response

    install_error_handlers(app)
    for module in (health, experiments, serving, rollouts):
        app.include_router(module.router)
    return app
