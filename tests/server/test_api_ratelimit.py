"""Per-tenant request rate limits (429 + Retry-After), the auth cache's bound on a revoked
key, and read-only transactions for GET requests."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from api_support import Api, make_api
from sqlalchemy import text

from mixloom.server.ratelimit import AuthCache, RateLimitedError, RateLimiter
from mixloom.storage import tenants
from mixloom.storage.records import TenantRecord

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def limited_api(tmp_path: Path, sqlite_template: Path) -> Iterator[Api]:
    path = tmp_path / "mixloom.db"
    shutil.copy(sqlite_template, path)
    yield from make_api(
        tmp_path,
        f"sqlite:///{path}",
        None,
        rate_limit_per_second=2.0,
        rate_limit_burst=3,
        auth_cache_seconds=0.5,
    )


def test_over_the_burst_is_429_with_retry_after_and_other_tenants_are_unaffected(
    limited_api: Api,
) -> None:
    a, b = limited_api.tenant(), limited_api.tenant()
    c = limited_api.client
    codes = [c.get(JOBS, headers=a).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    r = c.get(JOBS, headers=a)
    assert r.status_code == 429
    retry_after = int(r.headers["Retry-After"])
    assert retry_after >= 1
    error = r.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "quota_exceeded"
    assert "retry after" in error["message"] and error["param"] is None
    assert c.get(JOBS, headers=b).status_code == 200  # its own bucket
    time.sleep(retry_after)
    assert c.get(JOBS, headers=a).status_code == 200


def test_requests_without_a_valid_key_spend_no_tenant_s_rate(limited_api: Api) -> None:
    a = limited_api.tenant()
    for _ in range(10):
        assert limited_api.client.get(JOBS).status_code == 401
    assert limited_api.client.get(JOBS, headers=a).status_code == 200


def test_a_revoked_key_is_refused_within_auth_cache_seconds(limited_api: Api) -> None:
    a = limited_api.tenant()
    key = a["Authorization"].removeprefix("Bearer ")
    assert limited_api.client.get("/v1/files", headers=a).status_code == 200  # now cached
    with limited_api.ctx.db.transaction() as s:
        tenants.revoke_api_key(session=s, key=key)
    time.sleep(limited_api.settings.auth_cache_seconds + 0.1)
    r = limited_api.client.get("/v1/files", headers=a)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=10.0, burst=2, clock=lambda: now[0])
    limiter.take("t")
    limiter.take("t")
    with pytest.raises(RateLimitedError) as caught:
        limiter.take("t")
    assert caught.value.retry_after == pytest.approx(0.1)
    now[0] = 0.1
    limiter.take("t")
    with pytest.raises(RateLimitedError):
        limiter.take("t")
    RateLimiter(rate=0, burst=1).take("t")  # off


def test_auth_cache_forgets_after_its_ttl_and_stores_only_successes() -> None:
    now = [0.0]
    cache = AuthCache(ttl=2.0, clock=lambda: now[0])
    tenant = TenantRecord(
        id="tenant-1",
        name="t",
        created_at=datetime.now(UTC),
        max_queued_jobs=None,
        max_running_jobs=None,
        max_file_bytes=None,
        max_total_bytes=None,
    )
    assert cache.lookup("api_key", "k") is None
    cache.store("api_key", "k", tenant)
    assert cache.lookup("api_key", "k") is tenant
    assert cache.lookup("session", "k") is None
    now[0] = 2.0
    assert cache.lookup("api_key", "k") is None
    assert AuthCache(ttl=0).lookup("api_key", "k") is None


def test_a_get_request_reads_without_the_write_lock(sqlite_api: Api) -> None:
    """SQLite: a GET is served while another connection holds the write lock (before, every
    transaction began IMMEDIATE and waited for it)."""
    h = sqlite_api.tenant()
    assert sqlite_api.client.get(JOBS, headers=h).status_code == 200  # key cached
    with sqlite_api.ctx.db.transaction() as s:
        s.execute(text("SELECT 1"))  # BEGIN IMMEDIATE: holds the write lock from here
        assert sqlite_api.client.get(JOBS, headers=h).status_code == 200
        assert sqlite_api.client.get("/v1/files", headers=h).status_code == 200


def test_a_write_in_a_read_transaction_fails_loudly(sqlite_api: Api) -> None:
    with (
        pytest.raises(RuntimeError, match="read-only transaction"),
        sqlite_api.ctx.db.read() as s,
    ):
        tenants.create_tenant(session=s, name="nope")
