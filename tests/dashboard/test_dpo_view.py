"""A DPO job in the dashboard (headless Chromium, a live server, its metrics written through
the storage layer as the worker writes them): the method label, beta among the
hyperparameters, and the rewards, margin and reward-accuracy charts growing over SSE; a
supervised job's page has none of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clients.dpo_jobs import STEPS, add_dpo_step, create_dpo_job, dpo_values, finish_job
from dashboard.conftest import LAPTOP, PHONE, screenshot, sign_in
from live_server import TRAIN_ROWS, LiveServer

from mixloom.clients import Client
from mixloom.jobspec import Method


def _points(page: Any, chart: str) -> int:
    return int(page.get_attribute(chart, "data-points") or 0)


def _wait_points(page: Any, chart: str, n: int) -> None:
    page.wait_for_function(
        "([sel, n]) => +document.querySelector(sel).dataset.points === n", arg=[chart, n]
    )


def _path(page: Any, chart: str, series: str) -> list[tuple[float, float]]:
    """The (x, y) pixels of a series' line, from its SVG path ("M x,y L x,y ...")."""
    d = page.get_attribute(f"{chart} path[data-series='{series}']", "d")
    return [
        (float(x), float(y))
        for x, y in (p.split(",") for p in d.replace("M", " ").replace("L", " ").split())
    ]


def _y_ticks(page: Any, chart: str) -> dict[str, float]:
    """The y-axis labels of a chart and the height (pixels) each stands at."""
    return dict(
        page.eval_on_selector_all(
            f"{chart} text[text-anchor='end']",
            "ts => ts.map(t => [t.textContent, +t.getAttribute('y') - 4])",
        )
    )


def _wait_method(page: Any, label: str) -> None:
    """Until the job page's details show this method (a page replaces the last one's
    details as it renders: reading them before would read a half-built list)."""
    page.wait_for_function(
        """label => [...document.querySelectorAll('#job-details dt')].some(
            dt => dt.textContent === 'Method' && dt.nextSibling
                && dt.nextSibling.textContent === label)""",
        arg=label,
    )


def _details(page: Any) -> dict[str, str]:
    return dict(
        page.eval_on_selector_all(
            "#job-details dt", "dts => dts.map(dt => [dt.textContent, dt.nextSibling.textContent])"
        )
    )


def test_dpo_job_shows_its_method_and_reward_charts_live(
    page: Any, server: LiveServer, api_key: str, tmp_path: Path
) -> None:
    job_id = create_dpo_job(server, api_key, tmp_path)
    for step in range(1, 5):
        add_dpo_step(server, job_id, step)
    client = Client(server.url, api_key, max_retries=0)
    supervised = client.create_job(
        training_file=client.upload_file(TRAIN_ROWS).id,
        method="mixlora",
        hyperparameters={"num_experts": 4},
    )

    sign_in(page, api_key)
    rows = page.locator("#jobs-table tbody tr")
    rows.first.wait_for()
    methods = {
        r.get_attribute("data-job-id"): r.locator("td[data-label='Method']").inner_text()
        for r in rows.all()
    }
    assert methods == {supervised.id: "MixLoRA ×4", job_id: "DPO · MixLoRA ×4"}

    page.goto(f"/#/jobs/{job_id}")
    page.wait_for_selector(".badge[data-status='running']")
    _wait_points(page, "#rewards-chart", 8)  # chosen and rejected, 4 steps each
    assert page.is_visible("#dpo-charts")
    assert page.inner_text("section:has(#loss-chart) h2") == "DPO loss"
    _wait_method(page, "DPO · MixLoRA")
    details = _details(page)
    assert details["Method"] == "DPO · MixLoRA"
    assert details["beta"] == "0.1" and details["num_experts"] == "4"
    assert "label_smoothing" not in details  # 0: plain DPO
    assert list(details)[9] == "beta"  # the objective's first, after the job's own rows

    # chosen rewards rise above zero, rejected ones fall below it, step after step
    chosen = _path(page, "#rewards-chart", "chosen")
    rejected = _path(page, "#rewards-chart", "rejected")
    assert len(chosen) == len(rejected) == 4
    assert [x for x, _ in chosen] == [x for x, _ in rejected]
    assert all(c[1] < r[1] for c, r in zip(chosen, rejected, strict=True))  # SVG y grows down
    assert [y for _, y in chosen] == sorted((y for _, y in chosen), reverse=True)
    assert [y for _, y in rejected] == sorted(y for _, y in rejected)
    legend = page.locator("section:has(#rewards-chart) .legend").inner_text()
    assert legend.split() == ["chosen", "rejected"]
    assert _points(page, "#margin-chart") == 4 and _points(page, "#loss-chart") == 4

    # reward accuracy on a fixed 0..1 axis, each point at its value
    ticks = _y_ticks(page, "#reward-accuracy-chart")
    assert list(ticks) == ["0", "0.5", "1"]
    zero, one = ticks["0"], ticks["1"]
    shown = [(zero - y) / (zero - one) for _, y in _path(page, "#reward-accuracy-chart", "train")]
    expected = [dpo_values(step)["reward_accuracy"] for step in range(1, 5)]
    assert [round(v, 2) for v in shown] == [round(v, 2) for v in expected]
    assert page.inner_text("#stat-reward-accuracy") == "0.75"
    screenshot(page, "dashboard-dpo-training")

    # the last steps arrive over SSE: the charts grow, the validation accuracy shows
    for step in range(5, STEPS + 1):
        add_dpo_step(server, job_id, step)
    _wait_points(page, "#rewards-chart", 2 * STEPS)
    _wait_points(page, "#reward-accuracy-chart", STEPS + 1)  # + the validation point
    assert page.locator("#reward-accuracy-chart path[data-series='validation']").count() == 1
    assert _points(page, "#margin-chart") == STEPS
    assert page.inner_text("#stat-reward-accuracy") == "0.88"  # 0.875
    assert page.inner_text("#stat-val-loss") == "0.5800"
    finish_job(server, job_id)
    page.wait_for_selector(".badge[data-status='succeeded']")
    screenshot(page, "dashboard-dpo-succeeded")
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(300)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, "dashboard-dpo-phone")
    page.set_viewport_size(LAPTOP)

    # a supervised job's page, as before: no DPO charts or numbers
    page.goto(f"/#/jobs/{supervised.id}")
    page.wait_for_selector(".badge[data-status='queued']")
    _wait_method(page, "mixlora")
    assert page.is_hidden("#dpo-charts")
    assert page.inner_text("section:has(#loss-chart) h2") == "Loss"
    assert _details(page)["Method"] == "mixlora"
    assert page.locator("#stat-reward-accuracy").count() == 0
    assert "beta" not in _details(page)


def test_label_smoothing_shows_when_it_is_not_zero(
    page: Any, server: LiveServer, api_key: str, tmp_path: Path
) -> None:
    method = Method.model_validate(
        {
            "type": "dpo",
            "dpo": {
                "hyperparameters": {"beta": 0.25, "label_smoothing": 0.1},
                "adapter": {"type": "lora"},
            },
        }
    ).to_json()
    job_id = create_dpo_job(server, api_key, tmp_path, method)
    add_dpo_step(server, job_id, 1)
    sign_in(page, api_key)
    page.goto(f"/#/jobs/{job_id}")
    _wait_points(page, "#reward-accuracy-chart", 1)
    _wait_method(page, "DPO · LoRA")
    details = _details(page)
    assert details["Method"] == "DPO · LoRA"
    assert (details["beta"], details["label_smoothing"]) == ("0.25", "0.1")
