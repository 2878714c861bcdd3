"""The operator's view (/operator) in headless Chromium against a live server with an admin
key: a tenant's key is refused with the reason; the admin key shows the workers (what each
trains, by job and tenant id) and the queue per base; the key is kept in the page alone
(no cookie; a reload asks again). Screenshot in test-artifacts/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard.conftest import LAPTOP, screenshot
from live_server import TRAIN_ROWS, LiveServer, live_api

from mixloom.clients import Client
from mixloom.storage import jobs, models, workers
from mixloom.storage.records import JobStatus

ADMIN_KEY = "adm-view-" + "z" * 30


@pytest.fixture
def operated(tmp_path: Path) -> Iterator[LiveServer]:
    with live_api(tmp_path, admin_key=ADMIN_KEY) as server:
        yield server


@pytest.fixture
def operator_page(browser: Any, operated: LiveServer) -> Iterator[Any]:
    context = browser.new_context(viewport=LAPTOP, base_url=operated.url)
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_operator_view_shows_workers_and_queue_to_the_admin_key_only(
    operator_page: Any, operated: LiveServer
) -> None:
    page = operator_page
    key = operated.new_key("acme-operator-view")
    client = Client(operated.url, key, max_retries=0)
    f = client.upload_file(TRAIN_ROWS)
    trained, waiting = (client.create_job(training_file=f.id) for _ in range(2))
    base = trained.model
    with operated.db.transaction() as s:
        record = jobs.get_job(session=s, job_id=trained.id)
        jobs.set_job_status(session=s, job_id=trained.id, status=JobStatus.RUNNING)
        row = s.get(models.Job, trained.id)
        assert row is not None
        row.worker_id = "gpu-node-3:cuda:0"
        workers.register(
            session=s,
            worker_id="gpu-node-3:cuda:0",
            host="gpu-node-3",
            pid=77,
            base=base,
            source=record.model,
            role="all",
            devices="cuda:0",
            lease_seconds=30,
        )

    page.goto("/operator")
    page.fill("#admin-key", key)  # a tenant's key
    page.click("#sign-in")
    page.wait_for_selector("#login-error:not([hidden])")
    assert "operator's" in page.inner_text("#login-error")
    assert page.is_hidden("#nav")

    page.fill("#admin-key", ADMIN_KEY)
    page.click("#sign-in")
    page.wait_for_selector("#workers")
    worker = page.locator('[data-worker="gpu-node-3:cuda:0"]')
    text = worker.inner_text()
    assert "gpu-node-3" in text and "cuda:0" in text and "alive" in text and base in text
    assert worker.locator(f'[data-job="{trained.id}"]').inner_text().endswith(record.tenant_id)
    queued = page.locator(f'[data-base="{base}"]').inner_text()
    assert waiting.id in queued and record.tenant_id in queued
    assert page.inner_text('[data-state="running"] .value') == "1"
    assert page.context.cookies() == []  # the key stays in the page
    screenshot(page, "operator-view")

    page.reload()
    page.wait_for_selector("#admin-key")
    assert page.is_hidden("#nav")
