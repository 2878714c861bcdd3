"""The dashboard in headless Chromium against a live server: sign in, the jobs table at
laptop and phone widths, the create-job form with its validation messages, the live
chart over SSE while a job trains, controls, and downloads. Screenshots go to
test-artifacts/."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from dashboard.conftest import LAPTOP, PHONE, screenshot, sign_in
from live_server import TRAIN_ROWS, LiveServer, ScriptedWorker

from mixloom.clients import Client


def _client(server: LiveServer, key: str) -> Client:
    return Client(server.url, key, max_retries=0)


def _points(page: Any, chart: str = "#loss-chart") -> int:
    return int(page.get_attribute(chart, "data-points") or 0)


def test_wrong_key_shows_a_clear_message(page: Any) -> None:
    page.goto("/")
    page.click("#sign-in")
    assert page.inner_text("#login-error") == "Paste your API key first."
    page.fill("#api-key", "mxl-this-is-not-a-key")
    page.click("#sign-in")
    page.wait_for_selector("#login-error:not([hidden])")
    page.wait_for_function(
        "() => document.querySelector('#login-error').textContent.includes('not valid')"
    )
    message = page.inner_text("#login-error")
    assert "That API key is not valid" in message and "ask an admin" in message
    assert page.is_hidden("#nav")
    assert page.context.cookies() == []
    screenshot(page, "dashboard-sign-in-wrong-key")


def test_sign_in_jobs_table_laptop_and_phone(page: Any, server: LiveServer, api_key: str) -> None:
    client = _client(server, api_key)
    f = client.upload_file(TRAIN_ROWS, filename="arith.jsonl")
    lora = client.create_job(training_file=f.id, suffix="support-bot")
    mix = client.create_job(
        training_file=f.id, method="mixlora", hyperparameters={"num_experts": 4}
    )
    client.pause_job(lora.id)
    supervised = client.create_job(  # OpenAI's spelling, with mixloom's adapter section
        training_file=f.id,
        method={
            "type": "supervised",
            "supervised": {"adapter": {"type": "mixlora", "hyperparameters": {"num_experts": 3}}},
        },
    )

    sign_in(page, api_key)
    (cookie,) = page.context.cookies()
    assert cookie["name"] == "mixloom_session" and cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # the key is out of the page's reach

    rows = page.locator("#jobs-table tbody tr")
    rows.first.wait_for()
    assert rows.count() == 3
    assert rows.nth(0).get_attribute("data-job-id") == supervised.id
    assert "MixLoRA ×3" in rows.nth(0).inner_text()
    first = rows.nth(1)
    assert first.get_attribute("data-job-id") == mix.id
    assert first.locator(".badge").inner_text() == "queued"
    assert "MixLoRA ×4" in first.inner_text()
    assert rows.nth(2).locator(".badge").inner_text() == "paused"
    headers = page.locator("#jobs-table thead th").all_inner_texts()
    assert [h.lower() for h in headers] == [
        "job", "status", "method", "progress", "tokens/s", "eta", "created",
    ]  # fmt: skip
    screenshot(page, "dashboard-jobs-laptop")

    page.set_viewport_size(PHONE)
    page.reload()
    rows.first.wait_for()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], "the jobs page scrolls sideways on a phone"
    assert page.is_hidden("#jobs-table thead")  # rows become cards
    screenshot(page, "dashboard-jobs-phone")

    page.click("#sign-out")
    page.wait_for_selector("#login-form")
    assert page.context.cookies() == []


def test_create_job_from_the_form(
    page: Any, server: LiveServer, api_key: str, tmp_path: Path
) -> None:
    data = tmp_path / "support.jsonl"
    data.write_bytes(TRAIN_ROWS)
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"prompt": "only a prompt"}\nnot json\n')
    sign_in(page, api_key)
    page.click("text=+ New job")
    page.wait_for_selector("#new-job-form")
    assert page.input_value("#f-r") == "8" and page.input_value("#f-learning_rate") == "0.0002"

    # Checked in the browser before anything is sent.
    page.click("#create-job")
    assert "Choose an uploaded file" in page.inner_text("#error-training_file")
    page.fill("#f-r", "0")
    assert page.inner_text("#error-r") == "Must be ≥ 1 and ≤ 1024."
    page.fill("#f-lora_dropout", "1")
    assert page.inner_text("#error-lora_dropout") == "Must be ≥ 0 and < 1."
    screenshot(page, "dashboard-form-validation")
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, "dashboard-form-phone")
    page.set_viewport_size(LAPTOP)

    # The server's line-by-line file check, shown under the file field.
    page.fill("#f-r", "4")
    page.fill("#f-lora_dropout", "0.1")
    page.set_input_files("#f-training_file", str(bad))
    page.click("#create-job")
    page.wait_for_function(
        "() => document.querySelector('#error-training_file').textContent.length"
    )
    assert "broken.jsonl:2" in page.inner_text("#error-training_file")

    # The server's cross-field check (top_k > num_experts), placed on its field.
    page.set_input_files("#f-training_file", str(data))
    page.check("#f-method-mixlora")
    page.fill("#f-num_experts", "2")
    page.fill("#f-top_k", "3")
    page.click("#create-job")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "top_k (3) exceeds num_experts (2)" in page.inner_text("#new-job-form")

    page.fill("#f-top_k", "2")
    page.fill("#f-suffix", "from-the-form")
    page.click("#create-job")
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[-1]
    page.wait_for_selector(".badge[data-status='queued']")
    job = _client(server, api_key).get_job(job_id)
    hp = job.hyperparameters
    assert (job.method_type, hp["r"], hp["num_experts"], hp["top_k"], hp["lora_dropout"]) == (
        "mixlora", 4, 2, 2, 0.1,
    )  # fmt: skip
    assert job.suffix == "from-the-form"
    files = _client(server, api_key).list_files().data
    assert [f.filename for f in files] == ["support.jsonl"]  # the broken one was refused
    screenshot(page, "dashboard-form-created-job")


def test_live_chart_controls_and_downloads(
    page: Any, server: LiveServer, api_key: str, tmp_path: Path
) -> None:
    client = _client(server, api_key)
    f = client.upload_file(TRAIN_ROWS, filename="arith.jsonl")
    job = client.create_job(
        training_file=f.id, method="mixlora", hyperparameters={"num_experts": 4}
    )
    sign_in(page, api_key)
    page.goto(f"/#/jobs/{job.id}")
    page.wait_for_selector(".badge[data-status='queued']")
    assert _points(page) == 0 and page.is_enabled("#cancel-job")

    worker = ScriptedWorker(server, steps=12, tick=0.4, shared_with=2)
    worker.start(job.id)
    try:
        page.wait_for_selector(".badge[data-status='running']")
        page.wait_for_function("() => +document.querySelector('#loss-chart').dataset.points >= 2")
        early = _points(page)
        page.wait_for_function(
            f"() => +document.querySelector('#loss-chart').dataset.points >= {early + 3}"
        )
        assert _points(page) > early  # the chart grew while the job trained
        assert page.locator("#loss-chart path[data-series='train']").count() == 1
        assert page.locator("#router-load .expert").count() == 4
        page.wait_for_selector("#shared-with [data-shared]")
        assert page.inner_text("#shared-with") == "2 other jobs"  # how many, never which
        assert page.inner_text("#stat-tps") != "—" and "MiB" in page.inner_text("#stat-memory")
        screenshot(page, "dashboard-job-training")
        page.wait_for_selector("#checkpoints tbody tr")
        with page.expect_download() as dl:
            page.click("#checkpoints a.checkpoint-download")
        ckpt = tmp_path / "ckpt.zip"
        dl.value.save_as(ckpt)
        assert zipfile.is_zipfile(ckpt)
        page.wait_for_selector(".badge[data-status='succeeded']", timeout=20_000)
    finally:
        worker.close()
    page.wait_for_function(
        "() => +document.querySelector('#loss-chart').dataset.points >= 15"
    )  # 12 + 3 val
    assert page.locator("#loss-chart path[data-series='validation']").count() == 1
    assert page.inner_text("#stat-step") == "12 / 12"
    assert page.is_disabled("#cancel-job") and page.is_disabled("#pause-job")
    assert "Job succeeded" in page.inner_text("#events")
    with page.expect_download() as dl:
        page.click("#download-adapter")
    adapter = tmp_path / "adapter.zip"
    dl.value.save_as(adapter)
    assert "adapter_config.json" in zipfile.ZipFile(adapter).namelist()
    assert dl.value.suggested_filename == f"{job.id}-adapter.zip"
    screenshot(page, "dashboard-job-succeeded")
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(300)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, "dashboard-job-phone")


def test_cancel_pause_resume_buttons(page: Any, server: LiveServer, api_key: str) -> None:
    client = _client(server, api_key)
    f = client.upload_file(TRAIN_ROWS)
    job = client.create_job(training_file=f.id)
    sign_in(page, api_key)
    page.goto(f"/#/jobs/{job.id}")
    page.wait_for_selector(".badge[data-status='queued']")
    assert page.is_disabled("#resume-job")
    page.click("#pause-job")
    page.wait_for_selector(".badge[data-status='paused']")
    page.click("#resume-job")
    page.wait_for_selector(".badge[data-status='queued']")
    page.click("#cancel-job")
    page.wait_for_selector(".badge[data-status='cancelled']")
    assert page.is_disabled("#cancel-job") and page.is_hidden("#download-adapter")
    assert client.get_job(job.id).status == "cancelled"

    # A running job: cancel is requested, then carried out by the worker.
    running = client.create_job(training_file=f.id)
    worker = ScriptedWorker(server, steps=200, tick=0.3)
    worker.start(running.id)
    try:
        page.goto(f"/#/jobs/{running.id}")
        page.wait_for_selector(".badge[data-status='running']")
        page.click("#cancel-job")
        page.wait_for_selector(".badge[data-status='cancelled']")
    finally:
        worker.close()
    assert worker.finished[running.id] == "cancelled"
    assert "Job cancelled" in page.inner_text("#events")
    screenshot(page, "dashboard-job-cancelled")


def test_another_tenants_job_is_not_shown(page: Any, server: LiveServer, api_key: str) -> None:
    other = _client(server, server.new_key("someone-else"))
    job = other.create_job(training_file=other.upload_file(TRAIN_ROWS).id)
    sign_in(page, api_key)
    page.goto(f"/#/jobs/{job.id}")
    page.wait_for_selector(".alert:not([hidden])")
    assert "No job" in page.inner_text(".alert:not([hidden])")


def test_shares_steps_with_shows_a_count_and_no_literal_null(
    page: Any, server: LiveServer, api_key: str
) -> None:
    """Issue 17: a `null` appeared beside the chips under "Shares steps with" on every job
    that shared steps. The job page, shared or alone, shows no null, undefined or NaN."""
    client = _client(server, api_key)
    f = client.upload_file(TRAIN_ROWS, filename="arith.jsonl")
    sign_in(page, api_key)
    for shared_with, shown in ((1, "1 other job"), (0, "Trained alone at the latest step.")):
        job = client.create_job(training_file=f.id, method="lora")
        ScriptedWorker(server, steps=3, tick=0.01, shared_with=shared_with).run_job(job.id)
        page.goto(f"/#/jobs/{job.id}")
        page.wait_for_selector(".badge[data-status='succeeded']")
        page.wait_for_function(
            "(text) => document.querySelector('#shared-with').textContent.trim() === text",
            arg=shown,
        )
        assert page.inner_text("#shared-with").strip() == shown
        assert page.locator("#shared-with > *").count() == 1  # the chip (or the note) alone
        text = page.inner_text("main")
        for word in ("null", "undefined", "NaN", "[object Object]"):
            assert word not in text, (word, shared_with)
