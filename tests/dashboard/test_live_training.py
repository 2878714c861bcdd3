"""The dashboard over a real worker training a tiny model (the `mixloom serve` shape: API
and worker in one process, SQLite, in-process bus): a job created from the form trains
while its chart grows, then its adapter downloads from the job page and the playground
chats with it."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
from dashboard.conftest import screenshot, sign_in
from scheduler.helpers import arithmetic_rows, stack, write_jsonl
from tiny import save_tiny_base

from mixloom.storage import tenants


def _points(page: Any) -> int:
    return int(page.get_attribute("#loss-chart", "data-points") or 0)


def test_form_job_trains_with_a_live_chart_then_downloads(browser: Any, tmp_path: Path) -> None:
    base = save_tiny_base(tmp_path / "tiny-base")
    data = write_jsonl(tmp_path / "arith.jsonl", arithmetic_rows(64))
    with stack(tmp_path, base) as s:
        with s.db.transaction() as session:
            tenant = tenants.create_tenant(session=session, name="live")
            _, key = tenants.create_api_key(session=session, tenant_id=tenant.id)
        s.start_worker()
        context = browser.new_context(
            viewport={"width": 1366, "height": 860}, accept_downloads=True, base_url=s.url
        )
        context.set_default_timeout(60_000)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            sign_in(page, key)
            page.goto("/#/new")
            page.wait_for_selector("#new-job-form")
            page.set_input_files("#f-training_file", str(data))
            page.check("#f-method-mixlora")
            for field, value in {
                "r": "4",
                "num_experts": "4",
                "batch_size": "4",
                "n_epochs": "2",
                "max_steps": "12",
                "max_seq_len": "32",
                "learning_rate": "0.003",
                "checkpoint_every": "6",
            }.items():
                page.fill(f"#f-{field}", value)
            page.click("#create-job")
            page.wait_for_url("**/#/jobs/ftjob-*")
            job_id = page.url.rsplit("/", 1)[-1]

            page.wait_for_selector(".badge[data-status='running']")
            page.wait_for_function(
                "() => +document.querySelector('#loss-chart').dataset.points >= 3"
            )
            early = _points(page)
            page.wait_for_function(
                f"() => +document.querySelector('#loss-chart').dataset.points >= {early + 3}"
            )
            assert page.locator(".badge").first.get_attribute("data-status") == "running"
            assert page.locator("#router-load .expert").count() == 4
            screenshot(page, "dashboard-live-training")

            page.wait_for_selector(".badge[data-status='succeeded']", timeout=120_000)
            page.wait_for_selector("#download-adapter:not([hidden])")
            assert _points(page) >= 12
            assert page.locator("#checkpoints tbody tr").count() >= 2
            with page.expect_download() as dl:
                page.click("#download-adapter")
            adapter = tmp_path / "adapter.zip"
            dl.value.save_as(adapter)
            with zipfile.ZipFile(adapter) as z:
                names = set(z.namelist())
                config = json.loads(z.read("adapter_config.json"))
            assert {"adapter_config.json", "adapter_model.safetensors"} <= names
            assert config["peft_type"] == "MIXLORA" and config["num_experts"] == 4
            screenshot(page, "dashboard-live-training-succeeded")

            # the playground chats with the model just trained, streaming its answer: the
            # same greedy answer the API gives
            page.wait_for_selector("#playground:not([hidden])")
            page.fill("#playground-prompt", "2+2")
            page.fill("#playground-max-tokens", "12")
            page.fill("#playground-temperature", "0")
            page.click("#playground-send")
            try:
                page.wait_for_function(
                    "() => document.querySelector('#playground-stats').textContent"
                    ".includes('tokens/s')"
                )
            finally:
                screenshot(page, "dashboard-playground")
            shown = page.text_content("#playground-answer")
            model = page.text_content("#playground p.mono")
            direct = httpx.post(
                f"{s.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "2+2"}],
                    "max_tokens": 12,
                    "temperature": 0,
                },
                timeout=60,
            ).json()
            assert shown == direct["choices"][0]["message"]["content"]
            stats = page.text_content("#playground-stats")
            assert stats.startswith(f"{direct['usage']['completion_tokens']} tokens"), stats

            # a new job starts from a base model, never from a fine-tuned one
            page.goto("/#/new")
            page.wait_for_selector("#new-job-form")
            offered = page.eval_on_selector_all("#f-model option", "os => os.map(o => o.value)")
            assert offered == ["tiny-base"]
        finally:
            context.close()
        assert errors == []
        assert job_id
