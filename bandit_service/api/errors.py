"""Domain errors mapped to HTTP once: not found 404, conflict 409, invalid 422."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from abflow.core.errors import AbflowError, Conflict, Invalid, NotFound
from producers.contracts import InvalidEvent

STATUS = ((NotFound, 404), (Conflict, 409), (Invalid, 422))


def _detail(exc: AbflowError) -> str | dict:
    if isinstance(exc, InvalidEvent):  # the stream's reason codes, so a client can act on them
        body = {"reason": exc.reason, "message": exc.detail}
        return {"field": exc.field, **body} if exc.field else body
    return str(exc)


async def _handle(request: Request, exc: AbflowError) -> JSONResponse:  # noqa: ARG001 - FastAPI's signature
    status = next((code for kind, code in STATUS if isinstance(exc, kind)), 500)
    return JSONResponse({"detail": _detail(exc)}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AbflowError, _handle)
