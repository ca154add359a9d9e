"""Domain errors mapped to HTTP once: not found 404, conflict 409, invalid 422."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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


async def _unreadable_body(request: Request, exc: HTTPException):
    # FastAPI answers a body it cannot decode (not UTF-8, not JSON) with a bare 400; say what is wrong,
    # with the status every other malformed input gets.
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return JSONResponse({"detail": "the body is not JSON (UTF-8 text that parses as JSON)"}, status_code=422)
    return await http_exception_handler(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AbflowError, _handle)
    app.add_exception_handler(HTTPException, _unreadable_body)
