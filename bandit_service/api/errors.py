"""Errors mapped to HTTP once: not found 404, conflict 409, invalid 422, a dependency down 503.

PostgreSQL unreachable (refused, timed out, the pool empty for ``DATABASE_WAIT_SECONDS``) and a
Kafka publish that fails are 503 with a JSON body that names the dependency and ``Retry-After``:
a client backs off and tries again, and the service recovers by itself when the dependency does."""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg import OperationalError as PsycopgOperationalError
from psycopg_pool import PoolTimeout
from sqlalchemy.exc import OperationalError as SqlAlchemyOperationalError
from sqlalchemy.exc import TimeoutError as SqlAlchemyPoolTimeout
from starlette.exceptions import HTTPException

from abflow.core.errors import AbflowError, Conflict, Invalid, NotFound
from producers.contracts import InvalidEvent
from producers.publisher import PublishError

STATUS = ((NotFound, 404), (Conflict, 409), (Invalid, 422))
RETRY_AFTER_SECONDS = 2
DATABASE_DOWN = (PsycopgOperationalError, PoolTimeout, SqlAlchemyOperationalError, SqlAlchemyPoolTimeout)


def _detail(exc: AbflowError) -> str | dict:
    if isinstance(exc, InvalidEvent):  # the stream's reason codes, so a client can act on them
        body = {"reason": exc.reason, "message": exc.detail}
        return {"field": exc.field, **body} if exc.field else body
    return str(exc)


async def _handle(request: Request, exc: AbflowError) -> JSONResponse:  # noqa: ARG001 - FastAPI's signature
    status = next((code for kind, code in STATUS if isinstance(exc, kind)), 500)
    return JSONResponse({"detail": _encodable(_detail(exc))}, status_code=status)


async def _unreadable_body(request: Request, exc: HTTPException):
    # FastAPI answers a body it cannot decode (not UTF-8, not JSON) with a bare 400; say what is wrong,
    # with the status every other malformed input gets.
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return JSONResponse({"detail": "the body is not JSON (UTF-8 text that parses as JSON)"}, status_code=422)
    return await http_exception_handler(request, exc)


def _encodable(value):
    """``value`` with every string made UTF-8-safe: a lone surrogate a client sent (JSON allows
    "\\ud800") is echoed escaped, not left to fail the response's encoding (a 500)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_encodable(item) for item in value]
    if isinstance(value, dict):
        return {_encodable(key): _encodable(item) for key, item in value.items()}
    return value


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:  # noqa: ARG001
    return JSONResponse({"detail": _encodable(jsonable_encoder(exc.errors()))}, status_code=422)


def first_line(exc: BaseException) -> str:
    """An error's message in one short line (its type's name when it has none), UTF-8-safe."""
    text = str(exc).strip()
    return _encodable(text.splitlines()[0][:200] if text else type(exc).__name__)


def unavailable(dependency: str, problem: str) -> JSONResponse:
    return JSONResponse({"detail": f"{dependency} is unavailable: {problem}; try again shortly",
                         "dependency": dependency},
                        status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


async def _database_down(request: Request, exc: Exception) -> JSONResponse:
    state = getattr(request.app.state, "abflow", None)
    if state is not None:
        # The pools keep connections that died with the server: have them checked (at most once a
        # second), so that requests succeed again as soon as PostgreSQL is back.
        now = time.monotonic()
        if now - state.pools_checked_at > 1.0:
            state.pools_checked_at = now
            pending = [asyncio.ensure_future(state.assign_pool.check()), asyncio.ensure_future(
                asyncio.to_thread(state.pool.check))]
            for task in pending:
                task.add_done_callback(lambda done: done.exception())  # failures are the outage itself
    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    return unavailable("postgresql", first_line(cause))


async def _broker_down(request: Request, exc: Exception) -> JSONResponse:  # noqa: ARG001
    return unavailable("kafka", first_line(exc))


def install_error_handlers(app: FastAPI) -> None:
    for kind in DATABASE_DOWN:
        app.add_exception_handler(kind, _database_down)
    app.add_exception_handler(PublishError, _broker_down)
    app.add_exception_handler(AbflowError, _handle)
    app.add_exception_handler(HTTPException, _unreadable_body)
    app.add_exception_handler(RequestValidationError, _invalid_request)
