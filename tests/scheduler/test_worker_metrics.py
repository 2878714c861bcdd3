"""Prometheus metrics and the operator's view during a real run: `mixloom api` (two
processes sharing their counters) and `mixloom worker --metrics-port` on a tiny model, on
Postgres and Redis. Both scrapes parse with Prometheus's own parser; the worker's steps
and tokens counters move while a tenant's job trains; no scrape names a tenant or a job;
the admin key sees the worker and the job it trains, a tenant's key is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from claims import claim
from helpers import FAST, REPO, arithmetic_rows, free_port, stack, wait_for, write_jsonl
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from mixloom.clients import Client
from mixloom.model_ids import base_model_id
from mixloom.observability import start_worker_exporter
from mixloom.scheduler.worker import Worker
from mixloom.storage import tenants
from mixloom.storage.db import Database

pytestmark = pytest.mark.timeout(480)  # measured 36 s and 211 s on a shared 2-core machine

ADMIN_KEY = "adm-e2e-" + "x" * 32
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, headers: dict[str, str] | None = None) -> tuple[str, Samples]:
    r = httpx.get(url, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    parsed = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    return r.text, parsed


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def processes(tmp_path: Path, tiny_base: Path, pg_url: str, redis: str) -> Iterator[dict[str, str]]:
    """`mixloom api --workers 2` and one `mixloom worker --metrics-port`; yields their URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIXLOOM_", "PROMETHEUS_"))}
    env.update(
        MIXLOOM_DATA_DIR=str(tmp_path / "data"),
        MIXLOOM_DATABASE_URL=pg_url,
        MIXLOOM_REDIS_URL=redis,
        MIXLOOM_BASE_MODEL=str(tiny_base),
        MIXLOOM_DEVICE="cpu",
        MIXLOOM_KERNEL_BACKEND="torch",
        MIXLOOM_ADMIN_KEY=ADMIN_KEY,
        OMP_NUM_THREADS="1",
        **{f"MIXLOOM_{k.upper()}": str(v) for k, v in FAST.items()},
    )
    api_port, metrics_port = free_port(), free_port()
    cli = [sys.executable, "-m", "mixloom.cli"]
    procs = []
    try:
        for name, argv in (
            ("api", ["api", "--port", str(api_port), "--workers", "2", "--log-level", "warning"]),
            ("worker", ["worker", "--no-migrate", "--metrics-port", str(metrics_port)]),
        ):
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [*cli, *argv], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
                )
            )
            if name == "api":  # it migrates the schema the worker expects
                wait_for(lambda: _up(f"http://127.0.0.1:{api_port}/healthz"), timeout=90)
        yield {
            "api": f"http://127.0.0.1:{api_port}",
            "worker_metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            "log_dir": str(tmp_path),
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_metrics_move_while_a_job_trains_and_name_no_tenant(
    processes: dict[str, str], tmp_path: Path, tiny_base: Path, pg_url: str
) -> None:
    api, worker_metrics = processes["api"], processes["worker_metrics"]
    db = Database.connect(pg_url)
    try:
        with db.transaction() as s:
            tenant = tenants.create_tenant(session=s, name="metrics-acme-corp")
            _, key = tenants.create_api_key(session=s, tenant_id=tenant.id)
    finally:
        db.dispose()
    client = Client(api, api_key=key, timeout=30)
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(200, seed=1))
    upload = client.upload_file(data)
    base = base_model_id(str(tiny_base))
    job = client.create_job(
        training_file=upload.id,
        model=base,
        method="lora",
        # far more steps than the test waits for: it trains throughout, then is cancelled
        hyperparameters={"r": 4, "batch_size": 1, "n_epochs": 20, "max_seq_len": 32},
    )

    # the worker trains: its counters move between two scrapes while the job runs
    wait_for(lambda: _up(worker_metrics), timeout=120)

    def stepped(after: float = 0.0) -> tuple[str, Samples] | None:
        text, samples = scrape(worker_metrics)
        return (text, samples) if total(samples, "mixloom_worker_steps_total") > after else None

    first_text, first = wait_for(stepped, timeout=120, every=0.2)
    steps = total(first, "mixloom_worker_steps_total")
    second_text, second = wait_for(lambda: stepped(steps + 3), timeout=60, every=0.2)
    assert client.get_job(job.id).status == "running"
    assert total(second, "mixloom_worker_trained_tokens_total") > total(
        first, "mixloom_worker_trained_tokens_total"
    )
    assert total(second, "mixloom_worker_step_seconds_count") == total(
        second, "mixloom_worker_steps_total"
    )
    assert total(second, "mixloom_worker_claim_seconds_count", outcome="claimed") >= 1
    assert total(second, "mixloom_worker_jobs_held") == 1
    assert total(second, "mixloom_worker_info", base=base, role="all", device="cpu") == 1
    assert total(second, "process_resident_memory_bytes") > 0  # the CPU's memory gauge

    # the API: the database's state, and every process's request counts in one answer
    # (whichever of the two processes serves a request or a scrape: the counts add up)
    count = "mixloom_http_request_duration_seconds_count"
    healthz_before = total(scrape(f"{api}/metrics", ADMIN)[1], count, route="/healthz")
    for _ in range(12):
        assert httpx.get(f"{api}/healthz", timeout=5).status_code == 200
    client.get_job(job.id)
    api_text, api_samples = wait_for(
        lambda: (
            (got := scrape(f"{api}/metrics", ADMIN))
            and total(got[1], "mixloom_jobs", state="running") >= 1
            and got
        ),
        timeout=30,
        every=0.5,
    )
    assert total(api_samples, count, route="/healthz") == healthz_before + 12
    assert total(api_samples, count, route="/v1/fine_tuning/jobs/{job_id}", status="200") >= 1
    assert total(api_samples, "mixloom_workers_alive", base=base, role="all") == 1
    assert httpx.get(f"{api}/metrics", timeout=5).status_code == 401
    assert httpx.get(f"{api}/metrics", headers=_bearer(key), timeout=5).status_code == 403

    # nothing of the tenant in any scrape: name, id, job, file, key
    for text in (first_text, second_text, api_text):
        for secret in (tenant.name, tenant.id, job.id, upload.id, key):
            assert secret not in text

    # the operator's view: the worker and the job it trains, by the tenant's id
    refused = httpx.get(f"{api}/v1/admin/workers", headers=_bearer(key), timeout=5)
    assert refused.status_code == 403
    listed = httpx.get(f"{api}/v1/admin/workers", headers=ADMIN, timeout=5).json()["data"]
    # (the session's database also lists other tests' workers of this base, dead or alive)
    (worker,) = [w for w in listed if any(j["id"] == job.id for j in w["jobs"])]
    assert worker["base"] == base
    assert worker["alive"] and worker["role"] == "all" and worker["devices"] == "cpu"
    assert worker["jobs"] == [{"id": job.id, "tenant_id": tenant.id}]

    client.cancel_job(job.id)
    wait_for(lambda: client.get_job(job.id).status == "cancelled", timeout=60)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_dead_workers_expired_lease_is_counted(tmp_path: Path, tiny_base: Path) -> None:
    """The worker that finds a dead worker's lease expired counts it, by what became of
    the job (requeued here: its first crash)."""
    with stack(tmp_path, tiny_base) as s:
        client = s.client("expiry")
        upload = client.upload_file(write_jsonl(tmp_path / "t.jsonl", arithmetic_rows(4)))
        job = client.create_job(training_file=upload.id, model=base_model_id(str(tiny_base)))
        with s.db.transaction() as session:
            held = claim(session, model=str(tiny_base), worker="dead-worker", lease_seconds=0.05)
        assert held is not None and held.id == job.id
        name, labels = "mixloom_worker_lease_expiries_total", {"outcome": "requeued"}
        before = REGISTRY.get_sample_value(name, labels) or 0.0
        wait_for(lambda: client.get_job(job.id).status == "running", timeout=5)
        time.sleep(0.1)  # past the lease
        Worker(s.settings, db=s.db, bus=s.bus)._expire()  # what its loop runs
        assert client.get_job(job.id).status == "queued"
        assert REGISTRY.get_sample_value(name, labels) == before + 1


def test_a_metrics_port_in_use_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """Metrics never stop a worker: a second exporter on a taken port says so and goes on."""
    port = free_port()
    assert start_worker_exporter("127.0.0.1", port)
    assert "mixloom_worker_steps_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert not start_worker_exporter("127.0.0.1", port)
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
