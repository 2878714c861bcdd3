"""Uploads: every malformed line is a 400 naming it, memory stays bounded per request, the
number of uploads at once is limited, and a failed upload leaves nothing behind."""

from __future__ import annotations

import asyncio
import io
import os
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from api_support import GOOD_JSONL, Api, make_api
from fastapi import UploadFile
from malformed_jsonl import FILENAME, cases, check
from sqlalchemy import func, select

from mixloom.data.formats import validate_jsonl_file
from mixloom.errors import APIKeyError
from mixloom.server.limits import ConcurrencyLimit
from mixloom.server.routes import files as files_route
from mixloom.storage import files
from mixloom.storage import models as m

pytestmark = pytest.mark.timeout(300)
LINE = b'{"prompt": "' + b"x" * 200 + b'", "completion": "y"}\n'


def _stored(api: Api) -> tuple[int, list[str]]:
    """(file rows, every path under the files folder)."""
    with api.ctx.db.transaction() as s:
        rows = s.scalar(select(func.count()).select_from(m.File)) or 0
    folder = api.settings.files_dir
    return rows, sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_malformed_corpus_is_400_naming_the_line_or_200(api: Api) -> None:
    h = api.tenant()
    failures, server_errors = [], 0
    for case in cases():
        r = api.upload(h, case.data, filename=FILENAME)
        server_errors += r.status_code >= 500
        if why := check(case, r.status_code, r.json()):
            failures.append(why)
    assert server_errors == 0
    assert not failures, "\n".join(failures)


def test_upload_copy_and_validation_hold_a_chunk_not_the_file(tmp_path: Path) -> None:
    """The two passes over an upload (copy + hash, then validation) allocate a bounded
    amount whatever the file's size: 16 MiB here, under 4 MiB at the peak."""
    source = tmp_path / "source.jsonl"
    source.write_bytes(LINE * (16 * 1024 * 1024 // len(LINE)))
    part = tmp_path / "upload.part"
    with open(source, "rb") as f:
        upload = UploadFile(f, filename="train.jsonl")
        tracemalloc.start()
        try:
            size, _ = files_route._copy_capped(upload, part, cap=64 * 1024 * 1024)
            rows, problems = validate_jsonl_file(part, filename="train.jsonl")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert size == source.stat().st_size and problems == [] and rows > 70_000
    assert peak < 4 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for a 16 MiB upload"


def run_apart(coroutine: Any) -> Any:
    """asyncio.run on a thread of its own: the session's browser (tests/dashboard) keeps an
    event loop running on the main thread, where asyncio.run refuses to start another."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture
def no_uploads_api(tmp_path: Path, sqlite_template: Path) -> Iterator[Api]:
    path = tmp_path / "mixloom.db"
    path.write_bytes(sqlite_template.read_bytes())
    yield from make_api(tmp_path, f"sqlite:///{path}", None, max_concurrent_uploads=0)


def test_uploads_over_the_concurrency_limit_get_429_with_retry_after(
    no_uploads_api: Api,
) -> None:
    api = no_uploads_api
    h = api.tenant()
    r = api.upload(h)
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) > 0
    error = r.json()["error"]
    assert error["code"] == "too_many_concurrent_uploads" and "retry in" in error["message"]
    assert api.client.get("/v1/files", headers=h).status_code == 200  # other routes unaffected
    assert _stored(api) == (0, [])


def test_concurrency_limit_counts_requests_in_progress_and_frees_their_places() -> None:
    release = asyncio.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limit = ConcurrencyLimit(slow_app, limited=lambda m, p: p == "/up", limit=2, what="uploads")

    async def call(path: str) -> int:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "headers": []}
        await limit(scope, receive, send)
        return int(sent[0]["status"])

    async def scenario() -> list[int]:
        first = [asyncio.create_task(call("/up")) for _ in range(2)]
        await asyncio.sleep(0.01)
        refused = await call("/up")
        other = asyncio.create_task(call("/other"))  # not limited: waits like the first two
        await asyncio.sleep(0.01)
        release.set()
        done = [*await asyncio.gather(*first), refused, await other]
        return [*done, await call("/up")]  # the places are free again

    assert run_apart(scenario()) == [200, 200, 429, 200, 200]
    assert limit.active == 0


def test_upload_places_are_per_tenant_and_need_a_key_before_the_body() -> None:
    """One tenant cannot take every upload place, and a caller without a valid key gets a
    401 before any byte of its body is read."""
    release = asyncio.Event()
    bodies_read: list[str] = []

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def tenant_of(scope: Any) -> str:
        key = dict(scope["headers"]).get(b"authorization", b"").decode()
        tenant = {"Bearer a": "tenant-a", "Bearer b": "tenant-b"}.get(key)
        if tenant is None:
            raise APIKeyError("invalid API key", code="invalid_api_key")
        return tenant

    limit = ConcurrencyLimit(
        slow_app,
        limited=lambda m, p: p == "/up",
        limit=3,
        per_tenant=2,
        tenant_of=tenant_of,
        what="uploads",
    )

    async def call(key: str) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            bodies_read.append(key)
            return {"type": "http.request", "body": b"x", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        headers = [(b"authorization", key.encode())] if key else []
        scope = {"type": "http", "method": "POST", "path": "/up", "headers": headers}
        await limit(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in sent[1:])
        return int(sent[0]["status"]), body

    async def scenario() -> list[int]:
        a = [asyncio.create_task(call("Bearer a")) for _ in range(2)]
        await asyncio.sleep(0.01)
        a_third, _ = await call("Bearer a")  # a's two places are taken
        b = asyncio.create_task(call("Bearer b"))  # b still gets the third place
        await asyncio.sleep(0.01)
        no_key, text = await call("")
        bad_key, _ = await call("Bearer nobody")
        assert b"invalid_api_key" in text
        release.set()
        done = [s for s, _ in await asyncio.gather(*a, b)]
        return [*done, a_third, no_key, bad_key]

    assert run_apart(scenario()) == [200, 200, 200, 429, 401, 401]
    assert "" not in bodies_read and "Bearer nobody" not in bodies_read
    assert limit.active == 0 and limit.by_tenant == {}


def test_upload_without_a_key_is_401_before_the_body(sqlite_api: Api) -> None:
    r = sqlite_api.upload({"Authorization": "Bearer mxl-not-a-key"})
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert _stored(sqlite_api) == (0, [])


def test_invalid_line_50000_of_a_big_file_leaves_nothing(sqlite_api: Api) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    data = LINE * 49_999 + b'{"prompt": "a", "completion": 5}\n' + LINE * 10
    r = api.upload(h, data, filename=FILENAME)
    assert r.status_code == 400, r.text
    assert f"{FILENAME}:50000: completion" in r.json()["error"]["message"]
    assert _stored(api) == (0, [])


def test_quota_exceeded_upload_leaves_nothing(tmp_path: Path, sqlite_template: Path) -> None:
    path = tmp_path / "mixloom.db"
    path.write_bytes(sqlite_template.read_bytes())
    for api in make_api(tmp_path, f"sqlite:///{path}", None, max_tenant_bytes=100 * len(LINE)):
        h = api.tenant()
        assert api.upload(h, LINE * 60).status_code == 200
        before = _stored(api)
        r = api.upload(h, LINE * 60)
        assert r.status_code == 429, r.text
        error = r.json()["error"]
        assert error["code"] == "storage_quota_exceeded" and "this file" in error["message"]
        assert _stored(api) == before


def test_upload_whose_transaction_fails_leaves_nothing(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    api, h = sqlite_api, sqlite_api.tenant()

    def broken(**_: Any) -> Any:
        raise RuntimeError("database went away")

    monkeypatch.setattr(files_route.files, "create_file", broken)
    with pytest.raises(RuntimeError, match="database went away"):
        api.upload(h, LINE * 100)
    assert _stored(api) == (0, [])


def test_client_disconnect_mid_body_leaves_nothing(sqlite_api: Api) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    boundary = b"mixloomboundary"
    head = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
        b"fine-tune\r\n--" + boundary + b"\r\nContent-Disposition: form-data; "
        b'name="file"; filename="train.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'
    )
    chunks = [head, LINE * 5000, LINE * 5000]  # and then the client goes away
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": True} for c in chunks
    ]
    messages.append({"type": "http.disconnect"})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [
        (b"content-type", b"multipart/form-data; boundary=" + boundary),
        *((k.lower().encode(), v.encode()) for k, v in h.items()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/files",
        "raw_path": b"/v1/files",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "state": {},
    }
    run_apart(api.app(scope, receive, send))
    statuses = [s["status"] for s in sent if s["type"] == "http.response.start"]
    assert all(400 <= s < 500 for s in statuses), statuses
    assert _stored(api) == (0, [])


def test_good_upload_is_stored_whole_under_its_id(sqlite_api: Api) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    data = GOOD_JSONL + LINE * 5000  # > 1 MiB: spooled to disk, copied in chunks
    r = api.upload(h, data)
    assert r.status_code == 200, r.text
    body = r.json()
    rows, paths = _stored(api)
    assert rows == 1 and len(paths) == 1 and paths[0].endswith(f"/{body['id']}.jsonl")
    assert (api.settings.files_dir / paths[0]).read_bytes() == data
    assert body["bytes"] == len(data)
    got = api.client.get(f"/v1/files/{body['id']}/content", headers=h)
    assert got.content == data


def test_copy_reads_fixed_chunks(tmp_path: Path) -> None:
    """A 5 MiB upload is read 1 MiB at a time, never whole."""
    reads: list[int] = []

    class Recording(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            reads.append(-1 if size is None else size)
            return super().read(size)

    upload = UploadFile(Recording(b"x" * (5 * 1024 * 1024)), filename="f.jsonl")
    files_route._copy_capped(upload, tmp_path / "f.part", cap=64 * 1024 * 1024)
    assert reads and max(reads) == 1024 * 1024 and -1 not in reads


def test_unfinished_uploads_of_dead_processes_are_removed_at_start(tmp_path: Path) -> None:
    folder = tmp_path / "files" / "tenant-1"
    folder.mkdir(parents=True)
    stale, fresh, done = folder / "file-a.part", folder / "file-b.part", folder / "file-c.jsonl"
    for p in (stale, fresh, done):
        p.write_bytes(b"{}\n")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    os.utime(done, (hours_ago, hours_ago))
    assert files.remove_stale_parts(tmp_path / "files") == 1
    assert not stale.exists() and fresh.exists() and done.exists()  # another process's upload
