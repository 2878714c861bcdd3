"""Bad input gets a clear 4xx in the error envelope, and changes nothing stored."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from api_support import LORA, MODEL, Api
from sqlalchemy import func, select

from mixloom.storage import models as m
from mixloom.storage import tenants

JOBS = "/v1/fine_tuning/jobs"
pytestmark = pytest.mark.timeout(120)


def _snapshot(api: Api) -> tuple[Any, ...]:
    tables = (m.Tenant, m.ApiKey, m.File, m.Job, m.JobEvent, m.JobMetric, m.Checkpoint)
    with api.ctx.db.transaction() as s:
        counts = tuple(s.scalar(select(func.count()).select_from(t)) for t in tables)
        counts += (s.scalar(select(func.count()).select_from(m.IdempotencyRecord)),)
        jobs = tuple(s.execute(select(m.Job.id, m.Job.status, m.Job.updated_at)).all())
    on_disk = tuple(sorted(p.name for p in api.settings.data_dir.rglob("*") if p.is_file()))
    return counts, jobs, on_disk


@contextmanager
def unchanged(api: Api) -> Iterator[None]:
    before = _snapshot(api)
    yield
    assert _snapshot(api) == before


def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert "Traceback" not in r.text
    return dict(body["error"])


def test_malformed_jsonl_reports_every_line(sqlite_api: Api) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    data = (
        b'{"prompt": "a", "completion": "b"}\n'
        b"not json\n"
        b'{"prompt": "a"}\n'
        b"\n"
        b'{"messages": [{"role": "wizard", "content": "x"}]}\n'
        b'{"instruction": 3, "output": "y"}\n'
    )
    with unchanged(api):
        err = _error(api.upload(h, data, filename="bad.jsonl"), 400)
    assert err["code"] == "invalid_file" and err["param"] == "file"
    wheres = [p["where"] for p in err["problems"]]
    for line in (2, 3, 5, 6):
        assert any(w.startswith(f"bad.jsonl:{line}") for w in wheres), wheres
    assert not any(w.startswith("bad.jsonl:1") for w in wheres)
    assert "bad.jsonl:2" in err["message"] and "bad.jsonl:6" in err["message"]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (b"\n\n  \n", "no examples"),
        (b"\xff\xfe not utf-8\n", "bad.jsonl:1"),
        (b"[1, 2]\n", "bad.jsonl:1"),
    ],
)
def test_empty_or_undecodable_files(sqlite_api: Api, data: bytes, needle: str) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    with unchanged(api):
        err = _error(api.upload(h, data, filename="bad.jsonl"), 400)
    assert needle in err["message"]


def test_upload_limits(small_api: Api) -> None:
    api, h = small_api, small_api.tenant()
    line = b'{"prompt": "' + b"x" * 100 + b'", "completion": "y"}\n'
    with unchanged(api):
        err = _error(api.upload(h, line * 30), 413)  # ~3.6 KB file, the cap is 2048
        assert err["code"] == "file_too_large"
        err = _error(api.upload(h, line * 1000), 413)  # body over the cap: refused unread
        assert err["code"] == "request_too_large"
        chunks = (line for _ in range(1000))  # no Content-Length: counted as it streams
        r = api.client.post(
            "/v1/files",
            headers={**h, "Content-Type": "multipart/form-data; boundary=x"},
            content=chunks,
        )
        assert _error(r, 413)["code"] == "request_too_large"
        err = _error(api.upload(h, line * 6), 400)  # 6 lines, the cap is 5
        assert "more than 5 lines" in err["message"]
        err = _error(api.upload(h, b'{"prompt": "a", "completion": "b"}\n', purpose="chat"), 400)
        assert err["param"] == "purpose"
    big = b'{"prompt": "' + b"x" * 330 + b'", "completion": "y"}\n'
    assert api.upload(h, big * 5).status_code == 200  # 1.8 KB of the tenant's 3000
    with unchanged(api):
        err = _error(api.upload(h, big * 5), 429)
    assert err["code"] == "storage_quota_exceeded"


def test_json_body_limits_and_syntax(small_api: Api) -> None:
    api, h = small_api, small_api.tenant()
    with unchanged(api):
        r = api.client.post(
            JOBS, headers={**h, "Content-Type": "application/json"}, content=b"{" * 5000
        )
        assert _error(r, 413)["code"] == "request_too_large"
        r = api.client.post(
            JOBS, headers={**h, "Content-Type": "application/json"}, content=b'{"model": '
        )
        assert "not valid JSON" in _error(r, 400)["message"]
        r = api.client.post(JOBS, headers={**h, "Content-Type": "application/json"}, content=b"[]")
        _error(r, 400)


def test_job_create_rejects_wrong_types_and_unknown_keys(sqlite_api: Api) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    fid = api.file_id(h)
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"seed": "abc"}, ["seed"]),
        ({"model": 5}, ["model"]),
        ({"method": {"type": "qlora"}}, ["method.type"]),
        (
            {"method": {"type": "lora", "lora": {"hyperparameters": {"rank": 8}}}},
            ["method.lora.hyperparameters.rank"],
        ),
        (
            {
                "method": {
                    "type": "lora",
                    "lora": {"hyperparameters": {"r": "big", "lora_alpha": -1}},
                }
            },
            ["method.lora.hyperparameters.r", "method.lora.hyperparameters.lora_alpha"],
        ),
        (
            {
                "method": {
                    "type": "mixlora",
                    "mixlora": {"hyperparameters": {"num_experts": 2, "top_k": 4}},
                }
            },
            ["method.mixlora.hyperparameters"],
        ),
        ({"method": {"type": "lora", "mixlora": {}}}, ["method"]),
        ({"hyperparameters": {"r": 8}}, ["hyperparameters"]),
        ({"suffix": "no spaces please"}, ["suffix"]),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, ["metadata"]),
    ]
    with unchanged(api):
        for patch, params in cases:
            err = _error(api.create_job(h, fid, **patch), 400)
            where = [p["where"] for p in err.get("problems") or [{"where": err["param"]}]]
            for param in params:
                assert any(w.startswith(param) for w in where), (patch, err)
        r = api.client.post(JOBS, headers=h, json={"training_file": fid})
        err = _error(r, 400)  # method may be left out (OpenAI's body); model may not
        assert err["param"] == "model" and "required" in err["message"]


def test_job_create_checks_the_served_model_and_files(sqlite_api: Api) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    fid = api.file_id(h)
    long_seq = {"type": "lora", "lora": {"hyperparameters": {"max_seq_len": 9000}}}
    with unchanged(api):
        err = _error(api.create_job(h, fid, model="gpt-17"), 400)
        assert err["param"] == "model" and MODEL in err["message"]
        err = _error(api.create_job(h, fid, method=long_seq), 400)
        assert err["param"] == "method.lora.hyperparameters.max_seq_len"
        err = _error(api.create_job(h, "file-nope"), 404)
        assert (err["param"], err["code"]) == ("training_file", "file_not_found")
        err = _error(api.create_job(h, fid, validation_file="file-nope"), 404)
        assert err["param"] == "validation_file"


def test_job_quota(small_api: Api) -> None:
    api, h = small_api, small_api.tenant()
    fid = api.file_id(h)
    api.job_id(h, fid)
    api.job_id(h, fid)
    with unchanged(api):
        err = _error(api.create_job(h, fid), 429)
    assert err["code"] == "job_quota_exceeded"


def test_missing_invalid_and_revoked_keys(sqlite_api: Api) -> None:
    api = sqlite_api
    with api.ctx.db.transaction() as s:
        t = tenants.create_tenant(session=s, name="revoked")
        record, key = tenants.create_api_key(session=s, tenant_id=t.id)
        tenants.revoke_api_key(session=s, key=record.id)
    with unchanged(api):
        for headers, code in [
            ({}, "missing_api_key"),
            ({"Authorization": "Bearer "}, "missing_api_key"),
            ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
            ({"Authorization": "Bearer mxl-not-a-key"}, "invalid_api_key"),
            ({"Authorization": f"Bearer {key}"}, "invalid_api_key"),
        ]:
            r = api.client.get(JOBS, headers=headers)
            assert _error(r, 401)["code"] == code
            assert r.headers["WWW-Authenticate"] == "Bearer"
            r = api.upload(headers)
            assert _error(r, 401)["code"] == code


def test_unknown_ids_routes_cursors_and_headers(sqlite_api: Api) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    jid = api.job_id(h)
    c = api.client
    with unchanged(api):
        for method, url in [
            ("GET", f"{JOBS}/ftjob-nope"),
            ("POST", f"{JOBS}/ftjob-nope/cancel"),
            ("POST", f"{JOBS}/ftjob-nope/pause"),
            ("POST", f"{JOBS}/ftjob-nope/resume"),
            ("GET", f"{JOBS}/ftjob-nope/events"),
            ("GET", f"{JOBS}/ftjob-nope/stream"),
            ("GET", f"{JOBS}/ftjob-nope/adapter"),
            ("GET", f"{JOBS}/{jid}/checkpoints/ftckpt-nope/adapter"),
            ("GET", "/v1/files/file-nope"),
            ("DELETE", "/v1/files/file-nope"),
        ]:
            _error(c.request(method, url, headers=h), 404)
        assert "no route" in _error(c.get("/v1/nothing-here", headers=h), 404)["message"]
        _error(c.put(JOBS, headers=h), 405)
        _error(c.get(f"{JOBS}/{jid}/events?after=garbage", headers=h), 400)
        _error(c.get(f"{JOBS}?limit=0", headers=h), 400)
        _error(c.get(f"{JOBS}?limit=1000", headers=h), 400)
        _error(c.get(f"{JOBS}?status=sleeping", headers=h), 400)
        _error(c.get(f"{JOBS}/{jid}/stream", headers={**h, "Last-Event-ID": "abc"}), 400)
        body = {"model": MODEL, "training_file": "x", "method": LORA}
        r = c.post(JOBS, headers={**h, "Idempotency-Key": "k" * 300}, json=body)
        assert _error(r, 400)["param"] == "Idempotency-Key"


def test_nul_bytes_and_odd_ids_are_400_or_404_on_every_backend(api: Api) -> None:
    h = api.tenant()
    fid = api.file_id(h)
    c = api.client
    with unchanged(api):
        _error(c.get("/v1/files/file%00x", headers=h), 400)
        _error(c.get("/v1/fine_tuning/jobs/" + "x" * 100, headers=h), 400)
        _error(c.get("/v1/files?after=a%00b", headers=h), 400)
        _error(c.get("/v1/files?purpose=a%00b", headers=h), 400)
        _error(api.create_job(h, "file-\x00"), 400)
        _error(api.create_job(h, fid, metadata={"k": "v\x00"}), 400)
        _error(c.post(JOBS, headers={**h, "Idempotency-Key": "k\x01"}, json={}), 400)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b"[" * 100_000, "nested deeper than 64 levels"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested deeper than 64 levels"),
        (b'{"prompt": "a", "completion": "b", "n": ' + b"7" * 5000 + b"}", "5,000 digits"),
    ],
    ids=["brackets_100k", "object_50k_deep", "int_5000_digits"],
)
def test_the_reported_lines_are_400_naming_the_line(api: Api, line: bytes, needle: str) -> None:
    h = api.tenant()
    data = b'{"prompt": "a", "completion": "b"}\n' * 3 + line + b"\n"
    with unchanged(api):
        err = _error(api.upload(h, data, filename="bad.jsonl"), 400)
    assert err["message"].startswith("bad.jsonl:4: ") and needle in err["message"]


JSON_BODY_CASES = [
    (b"[" * 100_000, "nested deeper than 64 levels"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested deeper than 64 levels"),
    (b'{"seed": ' + b"9" * 5000 + b"}", "5,000 digits"),
    (b'{"model": "\xff\xfe"}', "not UTF-8 (byte 0xff"),
    (b'{"model": "\\ud800"}', "unpaired surrogate"),
    (b'{"api_key": "a\\u0000"}', "NUL character"),
    (b'{"model": ', "not valid JSON: Expecting value"),
]


@pytest.mark.parametrize(("body", "needle"), JSON_BODY_CASES, ids=lambda v: str(v)[:20])
def test_bad_json_bodies_are_400_with_the_reason_on_every_route(
    sqlite_api: Api, body: bytes, needle: str
) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    jid = api.job_id(h)
    json_h = {**h, "Content-Type": "application/json"}
    with unchanged(api):
        for method, url, headers in [
            ("POST", JOBS, json_h),
            ("POST", f"{JOBS}/{jid}/cancel", json_h),
            ("POST", "/dashboard/session", {"Content-Type": "application/json"}),
            ("POST", "/dashboard/session", {"Content-Type": "application/merge-patch+json"}),
        ]:
            err = _error(api.client.request(method, url, headers=headers, content=body), 400)
            assert err["code"] == "invalid_json" and needle in err["message"], (url, err)
