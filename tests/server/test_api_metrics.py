"""The API's Prometheus `/metrics` and the operator's routes (`/v1/admin/*`): the scrape
parses, labels requests by route template, counts the queue per base and the jobs by
state from the database, and never names a tenant; only the admin key reads the operator
routes (a tenant's key: 403), and /metrics takes it once one is set."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_support import MODEL, Api, make_api
from prometheus_client.parser import text_string_to_metric_families

from mixloom.storage import models as m
from mixloom.storage import workers
from mixloom.storage.ids import new_id

ADMIN_KEY = "adm-" + "k" * 40
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(params=["sqlite", "postgres"])
def operated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    """The API with an admin key, on SQLite or on the session's Postgres database."""
    if request.param == "sqlite":
        path = tmp_path / "mixloom.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield from make_api(tmp_path, f"sqlite:///{path}", None, admin_key=ADMIN_KEY)
    else:
        url = request.getfixturevalue("pg_url")
        yield from make_api(tmp_path, url, request.getfixturevalue("redis"), admin_key=ADMIN_KEY)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a scrape, through Prometheus's parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def _tenant_identity(api: Api, headers: dict[str, str]) -> tuple[str, str]:
    job = api.job_id(headers)
    with api.ctx.db.transaction() as s:
        row = s.get(m.Job, job)
        assert row is not None
        tenant = s.get(m.Tenant, row.tenant_id)
        assert tenant is not None
        return tenant.id, tenant.name


def test_metrics_parse_label_routes_by_template_and_never_name_a_tenant(operated: Api) -> None:
    c = operated.client
    # the database's state is read at each scrape here, not kept STATE_CACHE_SECONDS
    operated.app.state.fleet_collector.ttl = 0.0
    before = samples(c.get("/metrics", headers=ADMIN).text)
    h = operated.tenant()
    tenant_id, tenant_name = _tenant_identity(operated, h)
    file_id = operated.file_id(h)
    job_id = operated.job_id(h, file_id)
    assert c.get(f"/v1/fine_tuning/jobs/{job_id}", headers=h).status_code == 200
    assert c.get(f"/v1/files/{file_id}", headers=h).status_code == 200
    assert c.get(f"/v1/no/such/{job_id}/{tenant_id}", headers=h).status_code == 404
    assert c.get("/static/app.css").status_code == 200
    assert c.request(f"X{job_id[-8:]}", "/healthz").status_code == 405  # a made-up method

    r = c.get("/metrics", headers=ADMIN)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = samples(r.text)
    count = "mixloom_http_request_duration_seconds_count"
    job_route = dict(method="GET", route="/v1/fine_tuning/jobs/{job_id}", status="200")
    assert value(after, count, **job_route) == value(before, count, **job_route) + 1
    file_route = dict(method="GET", route="/v1/files/{file_id}", status="200")
    assert value(after, count, **file_route) == value(before, count, **file_route) + 1
    unmatched = dict(method="GET", route="<unmatched>", status="404")
    assert value(after, count, **unmatched) == value(before, count, **unmatched) + 1
    static = dict(method="GET", route="/static/{path}", status="200")
    assert value(after, count, **static) == value(before, count, **static) + 1
    odd = dict(method="other", route="/healthz", status="405")
    assert value(after, count, **odd) == value(before, count, **odd) + 1
    # this test's tenant queued two jobs
    queued = value(after, "mixloom_queue_jobs", base=MODEL)
    assert queued - value(before, "mixloom_queue_jobs", base=MODEL) == 2
    assert value(after, "mixloom_jobs", state="queued") >= queued
    assert value(after, "mixloom_queue_oldest_wait_seconds", base=MODEL) >= 0
    assert {"running", "paused", "validating_files"} <= {
        dict(labels)["state"] for name, labels in after if name == "mixloom_jobs"
    }

    secrets = [tenant_id, tenant_name, job_id, file_id, h["Authorization"].split()[1]]
    for secret in secrets:
        assert secret not in r.text
    for name, labels in after:
        assert "tenant" not in dict(labels), name


def test_operator_routes_take_the_admin_key_and_refuse_a_tenants(operated: Api) -> None:
    c = operated.client
    h = operated.tenant()
    tenant_id, _ = _tenant_identity(operated, h)
    key = h["Authorization"].split()[1]
    signed_in = c.post("/dashboard/session", json={"api_key": key})
    assert signed_in.status_code == 200
    for path in ("/v1/admin/queue", "/v1/admin/workers", "/metrics"):
        assert c.get(path, headers=h).status_code == 403, path
        assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 403
        cookie_only = c.get(path)  # the tenant's dashboard session
        assert cookie_only.status_code == 401, path
    c.delete("/dashboard/session")
    refused = c.get("/v1/admin/queue", headers=h).json()["error"]
    assert refused["code"] == "operator_only" and "MIXLOOM_ADMIN_KEY" in refused["message"]

    queue = c.get("/v1/admin/queue", headers=ADMIN)
    assert queue.status_code == 200
    body = queue.json()
    (base,) = [b for b in body["data"] if b["base"] == MODEL]
    assert base["queued"] >= 1
    assert body["jobs_by_state"]["queued"] >= base["queued"]
    # the operator sees who waits longest, by tenant id
    assert base["oldest"]["tenant_id"].startswith("tenant")
    assert base["oldest"]["waited_seconds"] >= 0
    if base["queued"] == 1:
        assert base["oldest"]["tenant_id"] == tenant_id


def test_the_operator_sees_each_worker_and_what_it_trains(operated: Api) -> None:
    """A worker registered as `mixloom worker` registers itself, holding a tenant's job:
    /v1/admin/workers lists it with the job and its tenant's id; /metrics counts it by base
    and role, and names neither."""
    h = operated.tenant()
    job_id = operated.job_id(h)
    worker_id = new_id("worker")
    job = operated.claim(job_id, worker=worker_id)
    with operated.ctx.db.transaction() as s:
        workers.register(
            session=s,
            worker_id=worker_id,
            host="gpu-node-7",
            pid=4242,
            base=MODEL,
            source=MODEL,
            role="training",
            devices="cuda:0",
            lease_seconds=30,
        )
    body = operated.client.get("/v1/admin/workers", headers=ADMIN).json()
    (seen,) = [w for w in body["data"] if w["id"] == worker_id]
    assert seen["alive"] and seen["host"] == "gpu-node-7" and seen["devices"] == "cuda:0"
    assert seen["base"] == MODEL and seen["role"] == "training"
    assert 0 <= seen["heartbeat_age_seconds"] < 30
    assert seen["jobs"] == [{"id": job_id, "tenant_id": job.tenant_id}]
    assert operated.client.get("/v1/admin/workers", headers=h).status_code == 403

    operated.app.state.fleet_collector.ttl = 0.0
    scrape = operated.client.get("/metrics", headers=ADMIN).text
    assert value(samples(scrape), "mixloom_workers_alive", base=MODEL, role="training") >= 1
    assert job_id not in scrape and job.tenant_id not in scrape and worker_id not in scrape


@pytest.mark.parametrize("unset", [None, ""], ids=["unset", "empty"])
def test_without_an_admin_key_metrics_are_open_and_operator_routes_absent(
    tmp_path: Path, sqlite_template: Path, unset: str | None
) -> None:
    """No admin key, or an empty one (compose's `MIXLOOM_ADMIN_KEY: ${MIXLOOM_ADMIN_KEY:-}`)."""
    path = tmp_path / "mixloom.db"
    shutil.copy(sqlite_template, path)
    for api in make_api(tmp_path, f"sqlite:///{path}", None, admin_key=unset):
        c = api.client
        h = api.tenant()
        assert c.get("/metrics").status_code == 200
        for route in ("/v1/admin/queue", "/v1/admin/workers"):
            for headers in ({}, h, ADMIN):
                r = c.get(route, headers=headers)
                assert r.status_code == 404, (route, headers)
            assert "MIXLOOM_ADMIN_KEY" in r.json()["error"]["message"]
