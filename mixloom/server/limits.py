"""Request size limits, enforced on the raw byte stream before anything parses it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]

# Multipart framing around the file (boundaries, part headers, the `purpose` field).
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class _TooLarge(HTTPException):
    """Raised from `receive`; FastAPI re-raises HTTPExceptions met while reading a body."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


def too_large_message(limit: int) -> str:
    return (
        f"request body is larger than this route accepts ({limit} bytes); send less, "
        "or split a data file"
    )


class BodySizeLimit:
    """413 for a body over its route's limit: at once from Content-Length, or as soon as a
    chunked body passes it. `limit_for(method, path)` gives the limit in bytes."""

    def __init__(self, app: Any, limit_for: Callable[[str, str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _reply(send, 400, "Content-Length is not a number", "invalid_request_error")
                return
            if size > limit:
                await _reply_too_large(send, limit)
                return

        received = 0
        started = False
        rejected = False

        async def limited_receive() -> Message:
            nonlocal received
            message: Message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
            rejected = True
            await _reply_too_large(send, limit)


async def _reply_too_large(send: Send, limit: int) -> None:
    await _reply(send, 413, too_large_message(limit), "request_too_large", code="request_too_large")


async def _reply(
    send: Send, status: int, message: str, type_: str, code: str | None = None
) -> None:
    body = json.dumps(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
