"""Security headers on every response: the API's JSON, the dashboard, its assets, errors
(500s included) and SSE streams.

The dashboard loads only its own files (/static: no inline script or style element, no
outside URL; app.js sets styles through the CSSOM, which CSP allows), so its policy is
'self' alone. FastAPI's /docs and /redoc pages are the exception: they load Swagger UI and
ReDoc from a CDN with an inline bootstrap script.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

DASHBOARD_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_DOCS_CDN = "https://cdn.jsdelivr.net"
DOCS_CSP = (
    f"default-src 'self'; script-src 'self' 'unsafe-inline' {_DOCS_CDN}; "
    f"style-src 'self' 'unsafe-inline' {_DOCS_CDN}; img-src 'self' data: https:; "
    f"worker-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_DOCS_PATHS = ("/docs", "/redoc")

_COMMON = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


def _csp_for(path: str) -> bytes:
    docs = any(path == p or path.startswith(p + "/") for p in _DOCS_PATHS)
    return (DOCS_CSP if docs else DASHBOARD_CSP).encode()


class SecurityHeaders:
    """ASGI middleware: adds the headers a response does not already set."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [*_COMMON, (b"content-security-policy", _csp_for(scope["path"]))]

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in extra if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_security_headers(app: FastAPI) -> None:
    """Wrap the whole middleware stack, Starlette's ServerErrorMiddleware included, so that
    a 500 carries the headers too (an `add_middleware` one sits inside it)."""
    build = app.build_middleware_stack

    def build_with_headers() -> Any:
        return SecurityHeaders(build())

    app.build_middleware_stack = build_with_headers  # type: ignore[method-assign]
