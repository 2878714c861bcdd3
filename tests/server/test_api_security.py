"""What a tenant's responses do not give away, and the headers every response carries: a
queue position counted from the tenant's own jobs, a per-tenant cap on open streams (so one
tenant cannot take every slot), and CSP / nosniff / frame / referrer headers on JSON, SSE
and error responses (a 500 included)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest
import uvicorn
from api_support import Api
from fastapi.testclient import TestClient

pytestmark = pytest.mark.timeout(60)

HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def _assert_secure(response: httpx.Response, what: str) -> None:
    for name, value in HEADERS.items():
        assert response.headers.get(name) == value, (what, name)
    csp = response.headers.get("content-security-policy", "")
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, what


@pytest.fixture
def live(api: Api) -> Iterator[tuple[Api, str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield api, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_headers_on_json_and_error_responses(sqlite_api: Api) -> None:
    api = sqlite_api

    @api.app.get("/boom", include_in_schema=False)
    def boom() -> None:
        raise RuntimeError("a bug")

    h = api.tenant()
    client = api.client
    crashing = TestClient(api.app, raise_server_exceptions=False)
    responses = {
        "ok": client.get("/v1/models", headers=h),
        "401": client.get("/v1/fine_tuning/jobs"),
        "404": client.get("/v1/fine_tuning/jobs/ftjob-none", headers=h),
        "400": client.get("/v1/fine_tuning/jobs?limit=-1", headers=h),
        "413": client.post("/v1/fine_tuning/jobs", headers=h, content=b"x" * (2 << 20)),
        "500": crashing.get("/boom"),
        "openapi": client.get("/openapi.json"),
    }
    for what, response in responses.items():
        assert str(response.status_code) == what or what in ("ok", "openapi"), what
        _assert_secure(response, what)
    docs = client.get("/docs")  # Swagger UI: its CDN and inline bootstrap, nothing else
    assert "cdn.jsdelivr.net" in docs.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in docs.headers["content-security-policy"]


def test_queue_position_counts_only_the_tenants_own_jobs(api: Api) -> None:
    busy, quiet = api.tenant(), api.tenant()
    file_busy, file_quiet = api.file_id(busy), api.file_id(quiet)
    theirs = [api.job_id(busy, file_busy) for _ in range(3)]
    mine = api.job_id(quiet, file_quiet)

    def position(headers: dict[str, str], job_id: str) -> int:
        r = api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers)
        return int(r.json()["queue_position"])

    # other tenants' queued jobs (here, and in other tests' leftovers) count for nothing
    assert position(quiet, mine) == 1
    assert [position(busy, j) for j in theirs] == [1, 2, 3]
    api.claim(theirs[0])  # running: still one of the busy tenant's jobs ahead
    assert [position(busy, j) for j in theirs[1:]] == [2, 3]
    assert position(quiet, mine) == 1
    listed = api.client.get("/v1/fine_tuning/jobs", headers=quiet).json()["data"]
    assert [j["queue_position"] for j in listed] == [1]


def test_a_tenant_at_its_stream_cap_gets_429_while_another_still_streams(
    live: tuple[Api, str],
) -> None:
    api, base = live
    api.ctx.sse_streams.limit = 2
    greedy, other = api.tenant(), api.tenant()
    greedy_job, other_job = api.job_id(greedy), api.job_id(other)

    def url(job_id: str) -> str:
        return f"{base}/v1/fine_tuning/jobs/{job_id}/stream"

    with httpx.Client(timeout=10) as http, ExitStack() as open_streams:
        for _ in range(2):
            r = open_streams.enter_context(http.stream("GET", url(greedy_job), headers=greedy))
            assert r.status_code == 200
            _assert_secure(r, "stream")
        refused = http.get(url(greedy_job), headers=greedy)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        error = refused.json()["error"]
        assert error["code"] == "too_many_streams" and "2 streams open" in error["message"]
        _assert_secure(refused, "429")
        with http.stream("GET", url(other_job), headers=other) as r:
            assert r.status_code == 200  # the cap is the greedy tenant's alone
            assert next(r.iter_lines()).startswith("retry:")
    # closed streams give their slots back
    deadline = time.monotonic() + 10
    with httpx.Client(timeout=10) as http:
        while True:
            with http.stream("GET", url(greedy_job), headers=greedy) as r:
                if r.status_code == 200:
                    break
            assert time.monotonic() < deadline, "the closed streams kept their slots"
            time.sleep(0.2)


def test_a_stream_ends_soon_after_its_key_is_revoked(live: tuple[Api, str]) -> None:
    from mixloom.storage import tenants

    api, base = live
    api.settings.sse_auth_check_seconds = 0.5
    h = api.tenant()
    job_id = api.job_id(h)
    key = h["Authorization"].removeprefix("Bearer ")
    with httpx.Client(timeout=10) as http:
        with http.stream("GET", f"{base}/v1/fine_tuning/jobs/{job_id}/stream", headers=h) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            with api.ctx.db.transaction() as s:
                tenants.revoke_api_key(session=s, key=key)
            revoked = time.monotonic()
            for _ in lines:
                assert time.monotonic() - revoked < 5, "the stream outlived its key"
        assert time.monotonic() - revoked < 3
        # the reconnect is refused once the process's auth cache lets go of the key
        deadline = time.monotonic() + api.settings.auth_cache_seconds + 1
        while http.get(f"{base}/v1/fine_tuning/jobs/{job_id}", headers=h).status_code != 401:
            assert time.monotonic() < deadline, "the revoked key still authenticates"
            time.sleep(0.1)
        again = http.get(f"{base}/v1/fine_tuning/jobs/{job_id}/stream", headers=h)
        assert again.status_code == 401


def test_metrics_stored_with_job_ids_show_only_their_count(sqlite_api: Api) -> None:
    from mixloom.storage import jobs

    api = sqlite_api
    h = api.tenant()
    job_id = api.job_id(h)
    with api.ctx.db.transaction() as s:  # a record from before shared_with was a count
        jobs.add_metrics(
            session=s,
            job_id=job_id,
            step=1,
            values={"train_loss": 1.0, "shared_with": ["ftjob-theirs", "ftjob-other"]},
        )
    body = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", headers=h)
    assert body.json()["data"][0]["metrics"]["shared_with"] == 2
    assert "ftjob-theirs" not in body.text
