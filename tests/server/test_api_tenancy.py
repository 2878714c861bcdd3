"""Tenant isolation, checked by walking the app's route table: every route must be
classified here, so a new route cannot forget its ownership check."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from api_support import Api
from fastapi.routing import APIRoute

from mixloom.storage import jobs
from mixloom.storage.records import JobStatus

# Routes that need no API key and hold no tenant's objects.
PUBLIC = {("GET", "/v1/models")}
# Routes without path ids: lists must not show other tenants' objects, creates must not
# reach them. Each is checked below by name.
COLLECTIONS = {
    ("GET", "/v1/files"),
    ("POST", "/v1/files"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/usage"),
}


def _walk(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield from ((m, prefix + route.path) for m in route.methods)
        elif (inner := getattr(route, "original_router", None)) is not None:
            # FastAPI >= 0.16x keeps included routers nested instead of copying routes
            more = getattr(getattr(route, "include_context", None), "prefix", "") or ""
            yield from _walk(inner.routes, prefix + more)


def _routes(api: Api) -> list[tuple[str, str]]:
    """Every /v1 route, hidden ones too; checked against the OpenAPI document so that a
    change in how FastAPI stores routes cannot make this walk silently come back empty."""
    walked = {(m, p) for m, p in _walk(api.app.routes) if p.startswith("/v1") and m != "HEAD"}
    documented = {(m.upper(), p) for p, ops in api.app.openapi()["paths"].items() for m in ops}
    assert documented <= walked, f"route walk missed {documented - walked}"
    return sorted(walked)


@pytest.fixture
def owned(api: Api) -> dict[str, str]:
    """Tenant A's objects: a file, a finished job with a checkpoint and an adapter (finished,
    so that its SSE stream ends)."""
    h = api.tenant()
    fid = api.file_id(h)
    jid = api.job_id(h, fid)
    api.claim(jid)
    with api.ctx.db.transaction() as s:
        ckpt = jobs.add_checkpoint(session=s, job_id=jid, step=1, path=api.write_zip("c.zip"))
        jobs.add_metrics(session=s, job_id=jid, step=1, values={"train_loss": 1.0})
        jobs.set_adapter_path(session=s, job_id=jid, path=api.write_zip("a.zip"))
        jobs.release_job(session=s, job_id=jid, worker_id="worker-1", status=JobStatus.SUCCEEDED)
    return {"file_id": fid, "job_id": jid, "checkpoint_id": ckpt.id, **h}


def test_every_route_hides_other_tenants_objects(api: Api, owned: dict[str, str]) -> None:
    a = {"Authorization": owned["Authorization"]}
    b = api.tenant()
    c = api.client
    before = c.get(f"/v1/fine_tuning/jobs/{owned['job_id']}", headers=a).json()
    seen = set()
    for method, path in _routes(api):
        seen.add((method, path))
        if (method, path) in PUBLIC or (method, path) in COLLECTIONS:
            continue
        params = set(re.findall(r"{(\w+)}", path))
        assert params, f"{method} {path}: classify this route in test_api_tenancy.py"
        assert params <= owned.keys(), f"{method} {path}: no test object for {params}"
        url = path.format(**owned)
        r = c.request(method, url, headers=b)
        assert r.status_code == 404, f"{method} {url} as another tenant: {r.status_code}"
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
        assert owned["job_id"] not in r.text or "no job" in r.text
        if method == "GET":  # the owner does see it: the ids above are real
            assert c.get(url, headers=a).status_code == 200, f"{method} {url} as owner"
        no_key = c.request(method, url)
        assert no_key.status_code == 401, f"{method} {url} without a key"

    # collections
    assert c.get("/v1/files", headers=b).json()["data"] == []
    assert c.get("/v1/fine_tuning/jobs", headers=b).json()["data"] == []
    usage = c.get("/v1/usage", headers=b).json()
    assert usage["stored_bytes"] == usage["waiting_jobs"] == 0, usage
    r = api.create_job(b, owned["file_id"])
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"
    r = api.create_job(b, api.file_id(b), validation_file=owned["file_id"])
    assert r.status_code == 404 and r.json()["error"]["param"] == "validation_file"
    for method, path in COLLECTIONS:
        assert c.request(method, path).status_code == 401, f"{method} {path} without a key"

    assert seen >= PUBLIC | COLLECTIONS
    after = c.get(f"/v1/fine_tuning/jobs/{owned['job_id']}", headers=a).json()
    assert after == before  # B's cancel/pause/resume changed nothing
    assert c.get(f"/v1/files/{owned['file_id']}", headers=a).status_code == 200


def test_another_tenants_ids_look_like_missing_ones(api: Api, owned: dict[str, str]) -> None:
    b = api.tenant()
    theirs = api.client.get(f"/v1/fine_tuning/jobs/{owned['job_id']}", headers=b).json()
    missing = api.client.get("/v1/fine_tuning/jobs/ftjob-000000000000000000000000", headers=b)
    assert theirs["error"]["code"] == missing.json()["error"]["code"] == "job_not_found"
