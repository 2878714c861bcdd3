"""Limits enforced on the raw request before a route parses it: body size, uploads in
progress at once, and what a JSON body may hold."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException

from mixloom.data import strict_json
from mixloom.errors import APIKeyError

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


class ConcurrencyLimit:
    """429 with Retry-After, before the body is read, for a request to a limited route while
    `limit` others are in progress there, or `per_tenant` of the same tenant's. Answering at
    once (not queueing) keeps a waiting client's connection, body and memory off the
    server; clients retry after the delay.

    `tenant_of(scope)` names the caller from its headers alone (APIKeyError: answered 401
    here): FastAPI reads a body before its dependencies run, so without this a
    caller with no key could hold every place while it sent a large body slowly."""

    def __init__(
        self,
        app: Any,
        *,
        limited: Callable[[str, str], bool],
        limit: int,
        what: str,
        per_tenant: int | None = None,
        tenant_of: Callable[[Scope], Awaitable[str]] | None = None,
        retry_after_s: int = 2,
    ) -> None:
        self.app = app
        self.limited = limited
        self.limit = limit
        self.per_tenant = per_tenant
        self.tenant_of = tenant_of
        self.what = what
        self.retry_after_s = retry_after_s
        self.active = 0  # one event loop: no lock needed
        self.by_tenant: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.limited(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        tenant = None
        if self.tenant_of is not None:
            try:
                tenant = await self.tenant_of(scope)
            except APIKeyError as exc:
                await _reply(
                    send,
                    401,
                    exc.message,
                    "authentication_error",
                    code=exc.code,
                    headers=[(b"www-authenticate", b"Bearer")],
                )
                return
        mine = self.by_tenant.get(tenant, 0) if tenant is not None else 0
        if self.active >= self.limit:
            busy = f"{self.limit} {self.what} are in progress, the most this server takes at once"
        elif self.per_tenant is not None and mine >= self.per_tenant:
            busy = f"{mine} of your {self.what} are in progress, the most one tenant may have"
        else:
            busy = None
        if busy is not None:
            await _reply(
                send,
                429,
                f"{busy}; retry in {self.retry_after_s} s",
                "quota_exceeded",
                code="too_many_concurrent_uploads",
                headers=[(b"retry-after", str(self.retry_after_s).encode())],
            )
            return
        self.active += 1
        if tenant is not None:
            self.by_tenant[tenant] = mine + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            if tenant is not None:
                left = self.by_tenant[tenant] - 1
                if left:
                    self.by_tenant[tenant] = left
                else:
                    del self.by_tenant[tenant]


class JSONBodyCheck:
    """400 for a JSON body that `strict_json.loads` refuses (invalid UTF-8, nesting 100,000
    deep, a 5,000-digit integer, a lone surrogate or NUL escape, ...), with the reason,
    before FastAPI's `json.loads` meets it. The body is read here, within BodySizeLimit's
    limit (this must sit inside it), and handed on unchanged. `skip(method, path)`: routes
    whose bodies are not small JSON (uploads)."""

    def __init__(self, app: Any, skip: Callable[[str, str], bool]) -> None:
        self.app = app
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in ("GET", "HEAD", "OPTIONS")
            or not _is_json(scope)
            or self.skip(scope["method"], scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message: Message = await receive()
            if message["type"] != "http.request":  # disconnected: nothing to answer
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            problem = _json_problem(body)
            if problem is not None:
                await _reply(
                    send,
                    400,
                    f"the request body is not valid JSON: {problem}; send one JSON object in UTF-8",
                    "invalid_request_error",
                    code="invalid_json",
                )
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for a disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _is_json(scope: Scope) -> bool:
    """The content types FastAPI parses as JSON."""
    for name, value in scope.get("headers") or []:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or (
                media.startswith(b"application/") and media.endswith(b"+json")
            )
    return False


def _json_problem(body: bytes) -> str | None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 (byte 0x{body[e.start]:02x} at byte {e.start + 1})"
    try:
        strict_json.loads(text, non_finite=True)  # the job's models name such a field
    except strict_json.StrictJSONError as e:
        return str(e).removeprefix("invalid JSON: ")
    return None


async def _reply_too_large(send: Send, limit: int) -> None:
    await _reply(send, 413, too_large_message(limit), "request_too_large", code="request_too_large")


async def _reply(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
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
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
