"""Every error leaves the API as {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixloom.errors import (
    APIKeyError,
    DataError,
    MixloomError,
    ObjectNotFoundError,
    OperatorOnlyError,
    Problem,
    QuotaExceededError,
    RequestError,
    StateConflictError,
    TooLargeError,
    ValidationError,
    pydantic_problems,
)
from mixloom.server.schemas import ErrorResponse
from mixloom.storage.objects import STORE_RETRY_AFTER_S, StoreUnavailableError
from mixloom.storage.outage import Outage

log = logging.getLogger("mixloom.server")

# HTTP status -> error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    410: "not_found_error",
    411: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "quota_exceeded",
    500: "server_error",
    503: "server_error",
}
DATABASE_RETRY_AFTER_S = 2  # a database restart or failover takes seconds


class ObjectGoneError(ObjectNotFoundError):
    """A download whose file was recorded but is no longer on disk."""


_REQUEST_ERROR_STATUS: list[tuple[type[RequestError], int]] = [
    (APIKeyError, 401),
    (OperatorOnlyError, 403),
    (ObjectGoneError, 410),
    (ObjectNotFoundError, 404),
    (StateConflictError, 409),
    (TooLargeError, 413),
    (QuotaExceededError, 429),
]

# Declared on every route so the OpenAPI document tells clients (and schemathesis) the truth.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": ERROR_TYPES[code]}
    for code in (400, 401, 404, 409, 413, 429)
}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    problems: list[Problem] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "message": message,
        "type": ERROR_TYPES.get(status, "invalid_request_error"),
        "param": param,
        "code": code,
    }
    if problems and len(problems) > 1:
        body["problems"] = [{"where": p.where, "message": p.message} for p in problems]
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _request_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    status = next((s for cls, s in _REQUEST_ERROR_STATUS if isinstance(exc, cls)), 400)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return error_response(status, exc.message, param=exc.param, code=exc.code, headers=headers)


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    problems = exc.problems
    param: str | None
    if isinstance(exc, DataError):
        param, code = "file", "invalid_file"
    else:
        param, code = (problems[0].where or None if len(problems) == 1 else None), "invalid_value"
    return error_response(400, str(exc), param=param, code=code, problems=problems)


def _request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [Problem(_in_part(p.where), p.message) for p in pydantic_problems(exc)]
    return _validation_error(request, ValidationError(problems or "invalid request"))


def _in_part(where: str) -> str:
    """FastAPI's paths start with the request part (body, query, ...): the field is enough."""
    part, _, rest = where.partition(".")
    return rest if part in ("body", "query", "path", "header", "cookie") else where


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see /docs"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /docs"
    else:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    code = "request_too_large" if exc.status_code == 413 else None
    return error_response(
        exc.status_code, message, code=code, headers=getattr(exc, "headers", None)
    )


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    message = "internal error; the server logged it"
    if isinstance(exc, MixloomError):
        message = f"internal error: {exc}"
    return error_response(500, message, code="internal_error")


def database_outage() -> Outage:
    return Outage(
        "database",
        meanwhile="requests are answered 503 with Retry-After until it is back",
        logger=log,
    )


def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A lost or refused database connection (a restart, a failover, SQLite's lock wait
    running out) is the server's state, not the request's: 503 with Retry-After, and one
    log line for the outage, not a traceback per request."""
    assert isinstance(exc, DBAPIError)
    if not (isinstance(exc, OperationalError) or exc.connection_invalidated):
        return _unexpected(request, exc)
    outage: Outage = request.app.state.database_outage
    outage.failed(exc.orig if exc.orig is not None else exc)
    return error_response(
        503,
        f"the database is unavailable; retry in {DATABASE_RETRY_AFTER_S} s",
        code="database_unavailable",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


def _store_error(_: Request, exc: Exception) -> JSONResponse:
    """The object store unreachable (storage/objects.py): 503 with Retry-After; whatever
    the request was writing was not recorded."""
    log.warning("object store unavailable: %s", exc)
    return error_response(
        503,
        f"the object store is unavailable; nothing was stored, retry in {STORE_RETRY_AFTER_S} s",
        code="storage_unavailable",
        headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
    )


class DatabaseRecovery:
    """ASGI middleware: the first response that is not a 5xx after a database outage logs
    that the database is back (`Outage.ok`, a no-op while nothing failed)."""

    def __init__(self, app: Any, outage: Outage) -> None:
        self.app = app
        self.outage = outage

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.outage.since is None:
            await self.app(scope, receive, send)
            return

        async def watching_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] < 500:
                self.outage.ok()
            await send(message)

        await self.app(scope, receive, watching_send)


def install_error_handlers(app: FastAPI) -> None:
    app.state.database_outage = outage = database_outage()
    app.add_middleware(DatabaseRecovery, outage=outage)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(StoreUnavailableError, _store_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
