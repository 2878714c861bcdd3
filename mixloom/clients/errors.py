"""Typed errors of the Python client: one class per kind of failure, each carrying the
server's own message, type, param and code from its `{"error": {...}}` envelope."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixloom.errors import MixloomError


@dataclass(frozen=True)
class ServerProblem:
    """One of several problems the server found in a request (`error.problems`)."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class APIError(MixloomError):
    """The server answered with an error status. `str(exc)` is the server's message."""

    status_code: int = 0

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        problems: list[ServerProblem] | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.problems = problems or []
        self.body = body
        self.headers = headers or {}


class BadRequestError(APIError):
    """400: the request is invalid; `problems` lists everything the server found."""

    status_code = 400


class AuthenticationError(APIError):
    """401: the API key is missing, unknown or revoked."""

    status_code = 401


class NotFoundError(APIError):
    """404: no such object, or it belongs to another tenant."""

    status_code = 404


class ConflictError(APIError):
    """409: the object's state forbids the action (e.g. the adapter is not ready yet)."""

    status_code = 409


class GoneError(APIError):
    """410: the object was recorded but its bytes are gone."""

    status_code = 410


class PayloadTooLargeError(APIError):
    """413: the body or uploaded file is over the deployment's limit."""

    status_code = 413


class RateLimitError(APIError):
    """429: too many requests, or a tenant quota is full; still failing after retries."""

    status_code = 429


class ServerError(APIError):
    """5xx: the server failed; still failing after retries."""

    status_code = 500


class APIConnectionError(MixloomError):
    """The server could not be reached (refused, timed out, reset), even after retries."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    410: GoneError,
    413: PayloadTooLargeError,
    429: RateLimitError,
}


def error_for(status_code: int, body: Any, headers: dict[str, str] | None = None) -> APIError:
    """The typed exception for an error response (any status >= 400)."""
    envelope = body.get("error") if isinstance(body, dict) else None
    if isinstance(envelope, dict):
        message = str(envelope.get("message") or f"HTTP {status_code}")
        problems = [
            ServerProblem(str(p.get("where", "")), str(p.get("message", "")))
            for p in envelope.get("problems") or []
            if isinstance(p, dict)
        ]
        fields: dict[str, Any] = {
            "type": envelope.get("type"),
            "param": envelope.get("param"),
            "code": envelope.get("code"),
            "problems": problems,
        }
    else:
        text = body if isinstance(body, str) and body.strip() else ""
        message = f"HTTP {status_code}" + (f": {text.strip()[:500]}" if text else "")
        fields = {}
    cls = _BY_STATUS.get(status_code) or (ServerError if status_code >= 500 else APIError)
    return cls(message, status_code=status_code, body=body, headers=headers, **fields)
