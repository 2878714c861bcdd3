"""Tenant isolation, checked by walking the app's route table: every route must be
classified here, so a new route cannot forget its ownership check."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from api_support import MODEL, Api
from fastapi.routing import APIRoute

from mixloom.model_ids import checkpoint_model_id, fine_tuned_model_id
from mixloom.storage import jobs
from mixloom.storage.records import JobStatus

# Routes that need no API key and hold no tenant's objects (with a key, GET /v1/models also
# lists the caller's fine-tuned models: checked below).
PUBLIC = {("GET", "/v1/models")}
# Routes without path ids: lists must not show other tenants' objects, creates must not
# reach them. Each is checked below by name.
COLLECTIONS = {
    ("GET", "/v1/files"),
    ("POST", "/v1/files"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/usage"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
}
# The operator's routes take the admin key alone (tests/server/test_api_metrics.py: a
# tenant's key is a 403 there); with no admin key set, as here, they are a 404 to anyone.
OPERATOR = {("GET", "/v1/admin/workers"), ("GET", "/v1/admin/queue")}
# The inference routes name a model in their body: another tenant's is a missing one.
INFERENCE = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 1},
}


def _walk(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for route in routes:
        if isinstance(route, APIRoute):
            path = re.sub(r"{(\w+):\w+}", r"{\1}", route.path)  # {model_id:path}: as documented
            yield from ((m, prefix + path) for m in route.methods)
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
    so that its SSE stream ends), and the fine-tuned model the job made."""
    h = api.tenant()
    fid = api.file_id(h)
    jid = api.job_id(h, fid)
    job = api.claim(jid)
    model = fine_tuned_model_id(base=MODEL, org=job.tenant_id, suffix=None, job_id=jid)
    with api.ctx.db.transaction() as s:
        ckpt = jobs.add_checkpoint(session=s, job_id=jid, step=1, path=api.write_zip("c.zip"))
        jobs.add_metrics(session=s, job_id=jid, step=1, values={"train_loss": 1.0})
        jobs.set_adapter_path(
            session=s, job_id=jid, path=api.write_zip("a.zip"), fine_tuned_model=model
        )
        jobs.release_job(session=s, job_id=jid, worker_id="worker-1", status=JobStatus.SUCCEEDED)
    return {"file_id": fid, "job_id": jid, "checkpoint_id": ckpt.id, "model_id": model, **h}


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
        if (method, path) in OPERATOR:
            assert c.request(method, path, headers=b).status_code == 404, path
            continue
        params = set(re.findall(r"{(\w+)}", path))
        assert params, f"{method} {path}: classify this route in test_api_tenancy.py"
        assert params <= owned.keys(), f"{method} {path}: no test object for {params}"
        url = path.format(**owned)
        r = c.request(method, url, headers=b)
        assert r.status_code == 404, f"{method} {url} as another tenant: {r.status_code}"
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
        # a 404 may repeat the id it was sent, and says no more about it
        assert owned["job_id"] not in r.text or "no job" in r.text or "no model" in r.text
        if method == "GET":  # the owner does see it: the ids above are real
            assert c.get(url, headers=a).status_code == 200, f"{method} {url} as owner"
        no_key = c.request(method, url)
        assert no_key.status_code == 401, f"{method} {url} without a key"

    # collections
    assert c.get("/v1/files", headers=b).json()["data"] == []
    assert c.get("/v1/fine_tuning/jobs", headers=b).json()["data"] == []
    listed = [m["id"] for m in c.get("/v1/models", headers=b).json()["data"]]
    assert listed == [MODEL] == [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert owned["model_id"] in [m["id"] for m in c.get("/v1/models", headers=a).json()["data"]]
    usage = c.get("/v1/usage", headers=b).json()
    assert usage["stored_bytes"] == usage["waiting_jobs"] == 0, usage
    r = api.create_job(b, owned["file_id"])
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"
    r = api.create_job(b, api.file_id(b), validation_file=owned["file_id"])
    assert r.status_code == 404 and r.json()["error"]["param"] == "validation_file"
    for path, body in INFERENCE.items():
        for model in (owned["model_id"], checkpoint_model_id(owned["model_id"], 1)):
            r = c.post(path, headers=b, json={**body, "model": model})
            assert r.status_code == 404, f"POST {path} with another tenant's {model}: {r.text}"
            assert r.json()["error"]["code"] == "model_not_found"
    for method, path in COLLECTIONS:
        assert c.request(method, path).status_code == 401, f"{method} {path} without a key"

    assert seen >= PUBLIC | COLLECTIONS | OPERATOR
    after = c.get(f"/v1/fine_tuning/jobs/{owned['job_id']}", headers=a).json()
    assert after == before  # B's cancel/pause/resume changed nothing
    assert c.get(f"/v1/files/{owned['file_id']}", headers=a).status_code == 200


def test_another_tenants_ids_look_like_missing_ones(api: Api, owned: dict[str, str]) -> None:
    b = api.tenant()
    theirs = api.client.get(f"/v1/fine_tuning/jobs/{owned['job_id']}", headers=b).json()
    missing = api.client.get("/v1/fine_tuning/jobs/ftjob-000000000000000000000000", headers=b)
    assert theirs["error"]["code"] == missing.json()["error"]["code"] == "job_not_found"


def test_another_tenants_models_look_like_missing_ones(api: Api, owned: dict[str, str]) -> None:
    """By id, by checkpoint id, by the name a job had before migration 0003, by a bare job
    id, by guessing another tenant's org: the same 404 as a model that never existed."""
    b = api.tenant()
    model, jid = owned["model_id"], owned["job_id"]
    tries = [
        model,
        checkpoint_model_id(model, 1),
        f"ft:{MODEL}:mixloom:{jid}",  # its name before 0003
        f"{jid}:ckpt-step-1",
        jid,
        model.replace(model.split(":")[2], "tenant-guess"),
    ]
    missing = "ft:smollm2-135m:tenant-x::ftjob-000000000000000000000000"
    absent = api.client.get(f"/v1/models/{missing}", headers=b).json()["error"]
    for name in tries:
        for method in ("GET", "DELETE"):
            r = api.client.request(method, f"/v1/models/{name}", headers=b)
            assert r.status_code == 404, (method, name, r.text)
            err = r.json()["error"]
            assert err == {**absent, "message": absent["message"].replace(missing, name)}
    # the owner reaches them (a guessed org is no one's name for it)
    a = {"Authorization": owned["Authorization"]}
    for name in tries[:4]:
        assert api.client.get(f"/v1/models/{name}", headers=a).status_code == 200, name
    assert api.client.get(f"/v1/models/{tries[5]}", headers=a).status_code == 404
