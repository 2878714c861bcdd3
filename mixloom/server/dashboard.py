"""The web dashboard: static assets served by the app itself (no CDN, works offline) and
a cookie session, since the browser's EventSource cannot send an Authorization header.

Signing in opens a server-side session (storage/sessions.py) and stores its random token,
never the API key, in an HttpOnly, SameSite=Strict cookie (Secure over https). Signing out
revokes it on the server, so a copied cookie stops working too; so does revoking the API
key it was opened with. `SessionAuth` hands the token to `deps.current_tenant` on /v1/
requests without an Authorization header, so the dashboard speaks the same API as every
other client. State-changing requests made with the cookie must also carry
`X-Mixloom-Dashboard: 1`: a custom header that a cross-site form cannot send, so the
cookie alone never authorises a write.
"""

from __future__ import annotations

from datetime import timedelta
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Cookie, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from mixloom.jobspec import ALL_MODULES, LoraHyperparameters, MixLoraHyperparameters
from mixloom.server.deps import SESSION_TOKEN_SCOPE_KEY, Context, Credential, ServerContext
from mixloom.server.errors import error_response
from mixloom.storage import sessions
from mixloom.storage.records import TenantRecord

STATIC_DIR = Path(__file__).resolve().parent / "static"
SESSION_COOKIE = "mixloom_session"
CSRF_HEADER = b"x-mixloom-dashboard"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

router = APIRouter(include_in_schema=False)


class SignIn(BaseModel):
    api_key: Annotated[str, Field(min_length=1, max_length=512)]


def _session_tenant(ctx: ServerContext, token: str | None) -> TenantRecord | None:
    if not token:
        return None
    with ctx.db.transaction() as session:
        return sessions.authenticate_session(session=session, token=token)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/operator")
def operator_view() -> FileResponse:
    """The operator's page: workers and the queue, read with the admin key from
    /v1/admin/* (server/routes/admin.py); the page holds the key in memory only."""
    return FileResponse(STATIC_DIR / "operator.html", headers={"Cache-Control": "no-cache"})


@router.post("/dashboard/session")
def sign_in(ctx: Context, request: Request, body: SignIn) -> Response:
    lifetime = timedelta(hours=ctx.settings.dashboard_session_hours)
    with ctx.db.transaction() as session:
        signed_in = sessions.create_session(
            session=session, api_key=body.api_key.strip(), lifetime=lifetime
        )
    if signed_in is None:
        return error_response(
            401,
            "That API key is not valid: it is unknown or has been revoked. Check that you "
            "pasted the whole key (it starts with mxl-), or ask an admin for a new one.",
            param="api_key",
            code="invalid_api_key",
        )
    tenant = signed_in.tenant
    response = JSONResponse({"tenant": {"id": tenant.id, "name": tenant.name}})
    response.set_cookie(
        SESSION_COOKIE,
        signed_in.token,
        max_age=int(lifetime.total_seconds()),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.get("/dashboard/session")
def whoami(
    ctx: Context, token: Annotated[str | None, Cookie(alias=SESSION_COOKIE)] = None
) -> Response:
    tenant = _session_tenant(ctx, token)
    if tenant is None:
        return error_response(401, "not signed in", code="not_signed_in")
    return JSONResponse({"tenant": {"id": tenant.id, "name": tenant.name}})


@router.delete("/dashboard/session")
def sign_out(
    ctx: Context,
    request: Request,
    token: Annotated[str | None, Cookie(alias=SESSION_COOKIE)] = None,
) -> Response:
    if token:
        with ctx.db.transaction() as session:
            sessions.revoke_session(session=session, token=token)
        ctx.auth_cache.forget("session", token)
    response = JSONResponse({"signed_out": True})
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.get("/dashboard/hyperparameters")
def hyperparameters() -> dict[str, Any]:
    """Defaults and bounds for the create-job form, from the job schema itself."""
    return {
        "lora": LoraHyperparameters.model_json_schema(),
        "mixlora": MixLoraHyperparameters.model_json_schema(),
        "target_modules": list(ALL_MODULES),
    }


def _session_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"cookie":
            try:
                jar = SimpleCookie(value.decode("latin-1"))
            except CookieError:
                continue
            if SESSION_COOKIE in jar:
                return jar[SESSION_COOKIE].value
    return None


def scope_credential(scope: dict[str, Any]) -> Credential | None:
    """What a request's headers alone authenticate with: the bearer key, else the dashboard
    session cookie (for middleware that must know the caller before the body is read)."""
    headers: list[tuple[bytes, bytes]] = list(scope.get("headers") or [])
    for name, value in headers:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            key = key.strip()
            return Credential("api_key", key) if scheme.lower() == "bearer" and key else None
    token = _session_token(headers)
    return Credential("session", token) if token else None


class SessionAuth:
    """ASGI middleware: the session cookie stands in for a missing Authorization header
    on /v1/ routes (writes only with the CSRF header); `deps.current_tenant` checks it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers: list[tuple[bytes, bytes]] = list(scope.get("headers") or [])
            names = {name for name, _ in headers}
            token = None if b"authorization" in names else _session_token(headers)
            if token and (scope["method"] in _SAFE_METHODS or CSRF_HEADER in names):
                scope = dict(scope)
                scope[SESSION_TOKEN_SCOPE_KEY] = token
        await self.app(scope, receive, send)


def install_dashboard(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(SessionAuth)
