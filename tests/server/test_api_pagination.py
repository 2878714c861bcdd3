"""Cursor pagination (`after`, `limit`): every object exactly once, newest first."""

from __future__ import annotations

from api_support import Api


def _walk(api: Api, url: str, headers: dict[str, str], limit: int) -> list[list[str]]:
    pages, after = [], None
    while True:
        query = f"?limit={limit}" + (f"&after={after}" if after else "")
        body = api.client.get(url + query, headers=headers).json()
        ids = [x["id"] for x in body["data"]]
        pages.append(ids)
        if not body["has_more"]:
            return pages
        after = ids[-1]


def test_jobs_pages(api: Api) -> None:
    h = api.tenant(max_queued_jobs=100)
    fid = api.file_id(h)
    created = [api.job_id(h, fid) for _ in range(23)]
    pages = _walk(api, "/v1/fine_tuning/jobs", h, limit=10)
    assert [len(p) for p in pages] == [10, 10, 3]
    flat = [j for p in pages for j in p]
    assert flat == created[::-1]  # newest first, none twice, none missing
    other = api.tenant()
    assert api.client.get("/v1/fine_tuning/jobs", headers=other).json()["data"] == []


def test_jobs_filter_by_status(api: Api) -> None:
    h = api.tenant()
    fid = api.file_id(h)
    a, b = api.job_id(h, fid), api.job_id(h, fid)
    api.client.post(f"/v1/fine_tuning/jobs/{a}/cancel", headers=h)
    got = api.client.get("/v1/fine_tuning/jobs?status=cancelled", headers=h).json()["data"]
    assert [j["id"] for j in got] == [a]
    got = api.client.get("/v1/fine_tuning/jobs?status=queued", headers=h).json()["data"]
    assert [j["id"] for j in got] == [b]


def test_files_pages(api: Api) -> None:
    h = api.tenant()
    created = [api.file_id(h) for _ in range(5)]
    pages = _walk(api, "/v1/files", h, limit=2)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [f for p in pages for f in p] == created[::-1]
    body = api.client.get("/v1/files?limit=2", headers=h).json()
    assert (body["first_id"], body["last_id"]) == (created[-1], created[-2])
