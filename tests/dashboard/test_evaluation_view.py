"""The job page shows a job's evaluation: its adapter against the base on each task, as the
API reports it (a real worker, a real browser)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from dashboard.conftest import screenshot, sign_in
from scheduler.helpers import arithmetic_rows, stack, wait_status, write_jsonl
from tiny import save_tiny_base

LORA = {"type": "lora", "lora": {"hyperparameters": {"r": 4, "batch_size": 4, "max_seq_len": 32}}}


def test_the_job_page_shows_the_evaluation(browser: Any, tmp_path: Path) -> None:
    base = save_tiny_base(tmp_path / "tiny-base")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    with stack(tmp_path, base) as s:
        client = s.client("eval-view")
        f = client.upload_file(data)
        job = client.create_job(
            training_file=f.id,
            method=LORA,
            evaluation={"tasks": ["arc_easy", "piqa"], "limit": 3},
        )
        s.start_worker()
        wait_status(client, job.id, "succeeded")
        api = httpx.get(
            f"{s.url}/v1/fine_tuning/jobs/{job.id}/evaluation",
            headers={"Authorization": f"Bearer {client.api_key}"},
        ).json()
        context = browser.new_context(viewport={"width": 1366, "height": 860}, base_url=s.url)
        context.set_default_timeout(30_000)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            sign_in(page, str(client.api_key))
            page.goto(f"/#/jobs/{job.id}")
            page.wait_for_selector("#evaluation:not([hidden]) #evaluation-table tbody tr")
            rows = page.locator("#evaluation-table tbody tr")
            assert rows.count() == 2
            base_of = {r["task"]: r for r in api["results"] if r["model"] == "base"}
            for i, task in enumerate(("arc_easy", "piqa")):
                cells = rows.nth(i).locator("td").all_inner_texts()
                mine = next(r for r in api["results"] if r["task"] == task and r["model"] != "base")
                assert cells[0] == task and cells[1] == "3"
                assert cells[2].startswith(f"{100 * base_of[task]['acc']:.1f}%")
                assert cells[3].startswith(f"{100 * mine['acc']:.1f}%")
                assert cells[4].endswith("points")
            screenshot(page, "dashboard-evaluation")
        finally:
            context.close()
        assert errors == []
