"""The dashboard's session cookie and assets over plain HTTP (no browser): the cookie
holds a server-side session's token (never the API key) that signing out or revoking the
key ends, it stands in for the Bearer header on reads, writes also need the CSRF header,
and every asset is served by the app itself under a strict Content-Security-Policy."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from live_server import TRAIN_ROWS, LiveServer

from mixloom.clients import Client
from mixloom.server.dashboard import SESSION_COOKIE, STATIC_DIR
from mixloom.storage import models, tenants
from mixloom.storage.sessions import hash_token


@contextmanager
def _signed_in(server: LiveServer, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url) as http:
        response = http.post("/dashboard/session", json={"api_key": key})
        assert response.status_code == 200, response.text
        yield http


def test_sign_in_sets_an_http_only_strict_cookie(server: LiveServer, api_key: str) -> None:
    with httpx.Client(base_url=server.url) as http:
        wrong = http.post("/dashboard/session", json={"api_key": "mxl-nope"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/dashboard/session").status_code == 401

        right = http.post("/dashboard/session", json={"api_key": f"  {api_key} "})
        cookie = right.headers["set-cookie"]
        assert cookie.startswith("mixloom_session=")
        for attribute in ("HttpOnly", "SameSite=strict", "Path=/", "Max-Age="):
            assert attribute in cookie
        assert "Secure" not in cookie  # plain http here; https sets it
        assert http.get("/dashboard/session").json()["tenant"]["name"].startswith("web-")

        out = http.delete("/dashboard/session")
        assert 'mixloom_session=""' in out.headers["set-cookie"]
        assert http.get("/v1/fine_tuning/jobs").status_code == 401


def test_cookie_reads_but_writes_need_the_csrf_header(server: LiveServer, api_key: str) -> None:
    client = Client(server.url, api_key)
    job = client.create_job(training_file=client.upload_file(TRAIN_ROWS).id)
    with _signed_in(server, api_key) as http:
        assert http.get("/v1/fine_tuning/jobs").json()["data"][0]["id"] == job.id
        cancel = f"/v1/fine_tuning/jobs/{job.id}/cancel"
        forged = http.post(cancel)  # what a cross-site form could send
        assert forged.status_code == 401
        assert client.get_job(job.id).status == "queued"
        ok = http.post(cancel, headers={"X-Mixloom-Dashboard": "1"})
        assert ok.status_code == 200 and ok.json()["status"] == "cancelled"
        # An explicit Authorization header is never replaced by the cookie.
        bearer = http.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer mxl-x"})
        assert bearer.status_code == 401


def test_assets_are_served_by_the_app_with_no_outside_urls(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        index = http.get("/")
        assert index.status_code == 200 and "text/html" in index.headers["content-type"]
        for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', index.text):
            response = http.get(asset)
            assert response.status_code == 200, asset
        assert http.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        schema = http.get("/dashboard/hyperparameters").json()
        assert schema["mixlora"]["properties"]["num_experts"]["default"] == 8
        assert "q_proj" in schema["target_modules"]
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path.name


def test_a_replayed_cookie_after_sign_out_is_refused(server: LiveServer, api_key: str) -> None:
    with _signed_in(server, api_key) as http:
        token = http.cookies[SESSION_COOKIE]
        assert http.get("/v1/fine_tuning/jobs").status_code == 200
        assert http.delete("/dashboard/session").status_code == 200
    # Another client (an attacker who copied the cookie) sends it again.
    with httpx.Client(base_url=server.url, cookies={SESSION_COOKIE: token}) as replay:
        refused = replay.get("/v1/fine_tuning/jobs")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_session"
        assert replay.get("/dashboard/session").status_code == 401


def test_the_cookie_holds_a_token_stored_hashed_never_the_key(
    server: LiveServer, api_key: str
) -> None:
    with _signed_in(server, api_key) as http:
        set_cookie = http.post("/dashboard/session", json={"api_key": api_key}).headers[
            "set-cookie"
        ]
        token = http.cookies[SESSION_COOKIE]
    assert api_key not in set_cookie and api_key not in token
    assert token.startswith("mxs-") and len(token) > 40
    with server.db.transaction() as session:
        row = session.query(models.DashboardSession).filter_by(token_hash=hash_token(token)).one()
        assert row.expires_at > row.created_at
        stored = [r.token_hash for r in session.query(models.DashboardSession)]
    assert token not in stored


def test_revoking_the_key_ends_its_sessions_and_closes_their_stream(
    server: LiveServer, api_key: str
) -> None:
    job = Client(server.url, api_key).create_job(
        training_file=Client(server.url, api_key).upload_file(TRAIN_ROWS).id
    )
    with _signed_in(server, api_key) as http, _signed_in(server, api_key) as other:
        with http.stream("GET", f"/v1/fine_tuning/jobs/{job.id}/stream", timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("retry:")
            with server.db.transaction() as session:
                tenants.revoke_api_key(session=session, key=api_key)
            revoked = time.monotonic()
            for _ in lines:  # keepalives until the server ends the stream
                assert time.monotonic() - revoked < 10, "the stream outlived its key"
        closed_after = time.monotonic() - revoked
        assert closed_after < 2 * server.settings.sse_auth_check_seconds + 1
        # within the process's auth cache (auth_cache_seconds), every request is refused
        deadline = revoked + server.settings.auth_cache_seconds + 1
        while http.get("/v1/fine_tuning/jobs").status_code != 401:
            assert time.monotonic() < deadline, "the session outlived its key"
            time.sleep(0.1)
        assert other.get("/dashboard/session").status_code == 401  # every session of the key
        assert http.post("/dashboard/session", json={"api_key": api_key}).status_code == 401


def test_every_response_carries_the_security_headers(server: LiveServer, api_key: str) -> None:
    with httpx.Client(base_url=server.url) as http:
        responses = {
            "page": http.get("/"),
            "asset": http.get("/static/app.js"),
            "api": http.get("/v1/models", headers={"Authorization": f"Bearer {api_key}"}),
            "unauthenticated": http.get("/v1/fine_tuning/jobs"),
            "no route": http.get("/v1/nothing-here"),
            "bad sign-in": http.post("/dashboard/session", json={"api_key": "mxl-nope"}),
        }
    for what, r in responses.items():
        csp = r.headers.get("content-security-policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, what
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, what
        assert r.headers.get("x-content-type-options") == "nosniff", what
        assert r.headers.get("x-frame-options") == "DENY", what
        assert r.headers.get("referrer-policy") == "no-referrer", what
    # what the policy allows is all the page needs: no inline script or style
    page = responses["page"].text
    assert "<style" not in page and "style=" not in page
    assert all(re.search(r"src=", tag) for tag in re.findall(r"<script[^>]*>", page))
