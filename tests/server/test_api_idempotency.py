"""Idempotency-Key: a retry returns the first response and creates nothing new."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from api_support import LORA, MODEL, Api

JOBS = "/v1/fine_tuning/jobs"


def _count_jobs(api: Api, h: dict[str, str]) -> int:
    return len(api.client.get(f"{JOBS}?limit=100", headers=h).json()["data"])


def test_retried_job_create_returns_the_first_job(api: Api) -> None:
    h = api.tenant()
    fid = api.file_id(h)
    key = {**h, "Idempotency-Key": "create-1"}
    first = api.create_job(key, fid)
    second = api.create_job(key, fid)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert _count_jobs(api, h) == 1
    r = api.create_job(key, fid, seed=3)  # same key, different request
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert _count_jobs(api, h) == 1
    other = api.tenant()  # keys are per tenant
    assert (
        api.create_job({**other, "Idempotency-Key": "create-1"}, api.file_id(other)).status_code
        == 200
    )


def test_concurrent_retries_create_one_job(api: Api) -> None:
    h = api.tenant()
    fid = api.file_id(h)
    headers = {**h, "Idempotency-Key": "race"}
    body = {"model": MODEL, "training_file": fid, "method": LORA, "seed": 1}

    def post(_: int) -> tuple[int, str]:
        r = api.client.post(JOBS, headers=headers, json=body)
        return r.status_code, r.json().get("id", r.text)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(post, range(6)))
    assert {status for status, _ in results} == {200}
    assert len({job_id for _, job_id in results}) == 1
    assert _count_jobs(api, h) == 1


def test_retried_upload_returns_the_first_file(api: Api) -> None:
    h = api.tenant()
    key = {**h, "Idempotency-Key": "upload-1"}
    first, second = api.upload(key), api.upload(key)
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    listed = api.client.get("/v1/files", headers=h).json()["data"]
    assert len(listed) == 1
    files_on_disk = list((api.settings.files_dir).rglob("*.jsonl"))
    assert len(files_on_disk) == 1
    r = api.upload(key, data=b'{"prompt": "other", "completion": "file"}\n')
    assert r.status_code == 409


def test_a_rejected_request_does_not_use_up_its_key(api: Api) -> None:
    h = api.tenant()
    fid = api.file_id(h)
    key = {**h, "Idempotency-Key": "retry-after-fix"}
    bad = api.create_job(
        key, fid, method={"type": "lora", "lora": {"hyperparameters": {"rank": 4}}}
    )
    assert bad.status_code == 400
    good = api.create_job(key, fid)
    assert good.status_code == 200 and good.headers.get("Idempotent-Replayed") is None
