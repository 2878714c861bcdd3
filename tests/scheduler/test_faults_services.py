"""The services under a running fleet go away and come back: our own PostgreSQL restarted
(fast and immediate) and our own Redis killed, under real `mixloom api` and `mixloom worker`
processes training three tenants' jobs. The jobs finish equal to an uninterrupted run, the
API answers at worst a 5xx while PostgreSQL is down and nothing but 200s while Redis is, and
SSE streams catch up on every message.

The harness is tests/scheduler/faults.py, which bench/reliability.py runs for
bench/RELIABILITY.md's figures. Each test starts its own PostgreSQL and redis-server on free
ports (never the machine's), so they need the server binaries, not running services."""

from __future__ import annotations

from pathlib import Path

import faults
import pytest
from needs import need

pytestmark = pytest.mark.slow  # each runs a few minutes of training on a tiny model


def test_postgres_restart_mid_run_jobs_finish_equal_and_api_recovers(tmp_path: Path) -> None:
    need(faults.services_problem())
    # the last two outages outlast the worker's leases: when the database is back, either
    # its heartbeat renews them first or its own lease expiry re-queues the jobs it holds
    r = faults.postgres_restart(
        tmp_path,
        restarts=(("fast", 0.0), ("immediate", 6.0), ("fast", 6.0)),
        steps=48,
        lease_seconds=3.0,
    )
    assert r.crashes == []
    assert r.statuses == {"succeeded": 3}, r.lost
    assert r.lost == []
    assert r.overlaps == 0
    # while it was down, 5xx or no answer at worst; never a 4xx that a client would act on
    assert r.api["200"] > 0
    assert all(k == "200" or k.startswith("5") or k == "APIConnectionError" for k in r.api), r.api


def test_redis_outage_mid_run_jobs_finish_equal_and_streams_catch_up(tmp_path: Path) -> None:
    need(faults.services_problem())
    r = faults.redis_outage(tmp_path, down_seconds=5.0, steps=40, lease_seconds=3.0)
    assert r.crashes == []
    assert r.statuses == {"succeeded": 3}, r.lost
    assert r.lost == []  # includes every SSE stream: each message once, then `end`
    assert r.overlaps == 0
    assert set(r.api) == {"200"}, r.api  # the API reads the database, never Redis, for a job
