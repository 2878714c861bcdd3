"""A worker that shuts down checkpoints and re-queues its jobs; live progress reaches an SSE
stream. Embedded default stack: SQLite, in-process bus, worker threads."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from helpers import (
    adapter_tensors,
    arithmetic_rows,
    assert_same_tensors,
    metrics,
    stack,
    train_reference,
    wait_for,
    wait_status,
    workers_by_step,
    write_jsonl,
)

SPEC = {
    "name": "life",
    "seed": 8,
    "method": {
        "type": "mixlora",
        "mixlora": {
            "hyperparameters": {
                "r": 4,
                "lora_alpha": 8,
                "num_experts": 4,
                "learning_rate": 3e-3,
                "warmup_ratio": 0.0,
                "max_seq_len": 32,
                "batch_size": 1,
                "checkpoint_every": 5,
            }
        },
    },
}


def test_shutdown_requeues_and_the_next_worker_finishes_exactly(
    tmp_path: Path, tiny_base: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(20, seed=2))
    with stack(tmp_path, tiny_base) as s:
        client = s.client("life")
        f = client.upload_file(data)
        model = client.list_models()[0].id
        job_id = client.create_job(
            training_file=f.id, model=model, method=SPEC["method"], seed=SPEC["seed"]
        ).id

        messages: list[Any] = []
        reader = threading.Thread(target=lambda: messages.extend(client.stream(job_id)))
        reader.start()

        s.start_worker(worker_id="first")
        wait_for(lambda: len(metrics(client, job_id)) >= 7, every=0.02)
        s.stop_workers()  # graceful: checkpoint at the current step, release as queued
        job = client.get_job(job_id)
        assert job.status == "queued", job.status
        events = [e.message for e in client.iter_events(job_id, page_size=100)]
        assert any("A worker shut down" in e for e in events), events
        assert not any("first" in e for e in events), events  # no worker names for tenants
        stopped_at = metrics(client, job_id)[-1].step
        assert stopped_at < 20
        assert stopped_at in [c.step_number for c in client.iter_checkpoints(job_id)]

        s.start_worker(worker_id="second")
        wait_status(client, job_id, "succeeded")
        series = metrics(client, job_id)
        worker_of = workers_by_step(s.db, job_id)
        second = [m for m in series if worker_of[m.step] == "second"]
        assert all("worker_id" not in m.metrics for m in series)  # operators' alone
        assert second[0].step == stopped_at + 1  # nothing lost, nothing repeated
        assert [m.step for m in series] == list(range(1, 21))

        reader.join(timeout=60)
        assert messages and messages[-1].event == "end"
        steps = [m.data["step"] for m in messages if m.event == "metrics"]
        assert steps == list(range(1, 21))
        statuses = [
            m.data["data"]["status"]
            for m in messages
            if m.event == "event" and (m.data.get("data") or {}).get("status")
        ]
        assert statuses[-1] == "succeeded" and "queued" in statuses

        reference = train_reference(tmp_path, tiny_base, data, [SPEC])
        got = adapter_tensors(client.download_adapter(job_id, tmp_path / "a.zip"), tmp_path / "a")
        assert_same_tensors(got, reference["life"])


def test_mixloom_serve_runs_api_and_worker_in_one_process(tmp_path: Path, tiny_base: Path) -> None:
    """`mixloom serve` on the embedded defaults (SQLite, in-process bus), a tiny base model."""
    import os
    import signal
    import subprocess
    import sys

    from helpers import REPO, free_port

    from mixloom.clients import Client

    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(8))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXLOOM_")}
    env.update(
        MIXLOOM_DATA_DIR=str(tmp_path / "data"),
        MIXLOOM_BASE_MODEL=str(tiny_base),
        MIXLOOM_DEVICE="cpu",
        OMP_NUM_THREADS="1",
    )
    cli = [sys.executable, "-m", "mixloom.cli"]
    key = subprocess.run(
        [*cli, "tenants", "create", "solo"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*cli, "serve", "--port", str(port), "--poll-seconds", "0.5"],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(url), timeout=120, every=0.5)
        client = Client(url, api_key=key, timeout=30)
        f = client.upload_file(data)
        job = client.create_job(
            training_file=f.id,
            model=str(tiny_base),
            method="mixlora",
            hyperparameters={"max_seq_len": 32, "batch_size": 4, "num_experts": 2},
        )
        done = wait_status(client, job.id, "succeeded", timeout=180)
        assert done.adapter_available
        assert client.download_adapter(job.id, tmp_path / "a.zip").stat().st_size > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]


def _up(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
