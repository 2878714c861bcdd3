"""The web dashboard: static assets served by the app itself (no CDN, works offline) and
a cookie session, since the browser's EventSource cannot send an Authorization header.

Signing in stores the API key in an HttpOnly, SameSite=Strict cookie. `SessionAuth` turns
that cookie into `Authorization: Bearer <key>` on /v1/ requests that carry none, so the
dashboard speaks the same API as every other client. State-changing requests made with
the cookie must also carry `X-Mixloom-Dashboard: 1`: a custom header that a cross-site
form cannot send, so the cookie alone never authorises a write.
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Cookie, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from mixloom.jobspec import ALL_MODULES, LoraHyperparameters, MixLoraHyperparameters
from mixloom.server.deps import Context
from mixloom.server.errors import error_response
from mixloom.storage import tenants

STATIC_DIR = Path(__file__).resolve().parent / "static"
SESSION_COOKIE = "mixloom_session"
SESSION_MAX_AGE_S = 7 * 24 * 3600
CSRF_HEADER = b"x-mixloom-dashboard"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

router = APIRouter(include_in_schema=False)


class SignIn(BaseModel):
    api_key: Annotated[str, Field(min_length=1, max_length=512)]


def _tenant_for(ctx: Any, api_key: str | None) -> Any:
    if not api_key:
        return None
    with ctx.db.transaction() as session:
        return tenants.authenticate(session=session, api_key=api_key)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.post("/dashboard/session")
def sign_in(ctx: Context, request: Request, body: SignIn) -> Response:
    key = body.api_key.strip()
    tenant = _tenant_for(ctx, key)
    if tenant is None:
        return error_response(
            401,
            "That API key is not valid: it is unknown or has been revoked. Check that you "
            "pasted the whole key (it starts with mxl-), or ask an admin for a new one.",
            param="api_key",
            code="invalid_api_key",
        )
    response = JSONResponse({"tenant": {"id": tenant.id, "name": tenant.name}})
    response.set_cookie(
        SESSION_COOKIE,
        key,
        max_age=SESSION_MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.get("/dashboard/session")
def whoami(
    ctx: Context, session: Annotated[str | None, Cookie(alias=SESSION_COOKIE)] = None
) -> Response:
    tenant = _tenant_for(ctx, session)
    if tenant is None:
        return error_response(401, "not signed in", code="not_signed_in")
    return JSONResponse({"tenant": {"id": tenant.id, "name": tenant.name}})


@router.delete("/dashboard/session")
def sign_out() -> Response:
    response = JSONResponse({"signed_out": True})
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/dashboard/hyperparameters")
def hyperparameters() -> dict[str, Any]:
    """Defaults and bounds for the create-job form, from the job schema itself."""
    return {
        "lora": LoraHyperparameters.model_json_schema(),
        "mixlora": MixLoraHyperparameters.model_json_schema(),
        "target_modules": list(ALL_MODULES),
    }


def _session_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"cookie":
            try:
                jar = SimpleCookie(value.decode("latin-1"))
            except CookieError:
                continue
            if SESSION_COOKIE in jar:
                return jar[SESSION_COOKIE].value
    return None


class SessionAuth:
    """ASGI middleware: the session cookie stands in for a missing Authorization header
    on /v1/ routes (writes only with the CSRF header)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers: list[tuple[bytes, bytes]] = list(scope.get("headers") or [])
            names = {name for name, _ in headers}
            key = None if b"authorization" in names else _session_key(headers)
            if key and (scope["method"] in _SAFE_METHODS or CSRF_HEADER in names):
                headers.append((b"authorization", f"Bearer {key}".encode("latin-1")))
                scope = dict(scope, headers=headers)
        await self.app(scope, receive, send)


def install_dashboard(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(SessionAuth)
