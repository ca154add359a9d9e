"""The HTTP API (FastAPI): the app, its state and its middleware; the routes are in ``routes/``.

Every endpoint but ``/ping``, ``/healthz`` and (by default) ``/metrics`` needs
``Authorization: Bearer <key>`` with a key of a role that may call it
(``deps``: serving, read, admin). Bad requests get a 4xx whose body names the
field and the problem; an unknown experiment is 404 (``errors``).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from abflow.settings import Settings, SettingsError
from bandit_service.api.deps import ApiState
from bandit_service.api.errors import install_error_handlers
from bandit_service.api.experiment_metrics import ExperimentCollector
from bandit_service.api.metrics import ApiMetrics
from bandit_service.api.routes import experiments, health, rollouts, serving
from producers.publisher import Publisher
from storage.db import make_engine

log = logging.getLogger("abflow.api")


DATABASE_WAIT_SECONDS = 2.0  # the longest a request waits for a PostgreSQL connection
CONNECT_TIMEOUT_SECONDS = 2  # libpq's, for a new connection (whole seconds)


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413 before any handler reads it: by its
    Content-Length, or, for a chunked body, by counting as it arrives."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.limit:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        payload = json.dumps({"detail": f"the request body is over the limit of {self.limit:,} bytes "
                                        "(ABFLOW_API_MAX_BODY_BYTES)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


class Observe:
    """Counts requests per route and status, and times them. A plain ASGI middleware: Starlette's
    ``BaseHTTPMiddleware`` runs every request through a task group and memory streams, which cost
    more than the assignment itself under load."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before it answers

        responded = False

        async def send_observed(message):
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except Exception:
            # Answered here rather than re-raised: the server would close the connection after a
            # 500 that escaped, and the client's next request on it would be reset.
            log.exception("%s %s failed", scope["method"], scope.get("path"))
            if not responded:
                payload = b'{"detail":"internal error; the server log has the details"}'
                await send_observed({"type": "http.response.start", "status": 500,
                                     "headers": [(b"content-type", b"application/json"),
                                                 (b"content-length", str(len(payload)).encode())]})
                await send_observed({"type": "http.response.body", "body": payload})
        finally:
            route = scope.get("route")
            path = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


def create_app(settings: Settings, publisher: Publisher | None = None) -> FastAPI:
    """The API over ``settings``' PostgreSQL and Kafka, for the holders of ``settings.api_keys``."""
    if not settings.api_keys.admin:
        raise SettingsError("the API needs at least one admin key (ABFLOW_API_KEYS_ADMIN)")
    metrics = ApiMetrics()

    # While PostgreSQL is down a request fails within these (503, see ``errors``), not after the
    # pools' defaults of 30 s: a client can back off, and the pools reconnect when it is back.
    connection_options = {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_SECONDS}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own_publisher = publisher is None
        state = ApiState(
            settings=settings, keys=settings.api_keys, metrics=metrics,
            pool=ConnectionPool(settings.libpq_url, min_size=2, max_size=16, timeout=DATABASE_WAIT_SECONDS,
                                kwargs=connection_options, open=True),
            assign_pool=AsyncConnectionPool(settings.libpq_url, min_size=4, max_size=16, timeout=DATABASE_WAIT_SECONDS,
                                            kwargs=connection_options, open=False),
            engine=make_engine(settings.require_database_url(), pool_timeout=DATABASE_WAIT_SECONDS,
                               connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS}),
            publisher=publisher or Publisher(settings.require_kafka_bootstrap(), settings.topics))
        await state.assign_pool.open()
        app.state.abflow = state
        experiments = ExperimentCollector(state.engine)
        metrics.registry.register(experiments)
        try:
            yield
        finally:
            metrics.registry.unregister(experiments)
            await state.assign_pool.close()
            state.pool.close()
            state.engine.dispose()
            if own_publisher:
                state.publisher.close()

    # /docs and /redoc load Swagger UI and ReDoc from the installed fastapi-offline package, not
    # from a CDN (and ReDoc without web fonts): they work where there is no internet.
    app = FastAPIOffline(title="abflow", version="0.1.0", lifespan=lifespan,
                         description="A/B tests and multi-armed bandits between ML model variants.")

    app.add_middleware(Observe, metrics=metrics)
    app.add_middleware(BodyLimit, limit=settings.api_max_body_bytes)
    install_error_handlers(app)
    for module in (health, experiments, serving, rollouts):
        app.include_router(module.router)
    return app
