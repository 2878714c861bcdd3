"""The dashboard's session cookie and assets over plain HTTP (no browser): the cookie
stands in for the Bearer header on reads, writes also need the CSRF header, and every
asset is served by the app itself."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from live_server import TRAIN_ROWS, LiveServer

from mixloom.clients import Client
from mixloom.server.dashboard import STATIC_DIR


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
