"""Leases sized from the measured step time: on a machine whose steps are slow for the
configured lease, the worker lengthens its leases by itself (LEASE_STEPS of its slowest
recent steps), so no step outlives its lease even when no heartbeat gets through, and
nobody needs to know --lease-seconds exists."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import arithmetic_rows, stack, wait_status, write_jsonl

from mixloom.scheduler.worker import LEASE_STEPS, Worker
from mixloom.storage import jobs
from mixloom.storage import models as m
from mixloom.trainer.session import TrainingSession

STEP_S = 0.6  # each fused step, slowed to this on top of its real time


def test_slow_steps_lengthen_the_lease_so_no_step_outlives_it(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    real_step = TrainingSession.step

    def slow_step(self: TrainingSession, names: Any = None) -> Any:
        result = real_step(self, names)
        time.sleep(STEP_S)
        return result

    monkeypatch.setattr(TrainingSession, "step", slow_step)

    def heartbeats(self: Worker, done: threading.Event) -> None:
        """Heartbeats until the worker has sized its leases from its steps; from then on
        none gets through (a starved thread, a slow database): only the lease taken before
        each step guards it."""
        while not done.wait(self.settings.worker_heartbeat):
            if getattr(self, "lease_seconds", 0.0) > 1.0:
                done.wait()
                return
            for job_id in list(self.held):
                self._renew(job_id)

    monkeypatch.setattr(Worker, "_heartbeats", heartbeats)
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16, seed=1))
    method = {"type": "lora", "lora": {"hyperparameters": {"r": 4, "batch_size": 2}}}
    caplog.set_level(logging.INFO, logger="mixloom.worker")
    with stack(tmp_path, tiny_base) as s:
        client = s.client("slow")
        f = client.upload_file(data)
        job_id = client.create_job(
            training_file=f.id, model=client.list_models()[0].id, method=method
        ).id
        # another worker's expiry pass, as often as it can run: a lease that lapses mid-step
        # hands the job back to the queue
        stop = threading.Event()
        leases: list[float] = []

        def expirer() -> None:
            while not stop.wait(0.02):
                with s.db.transaction() as session:
                    jobs.expire_leases(session=session, max_crashes=10)
                    row = session.get(m.Job, job_id)
                    if row is not None and row.lease_expires_at is not None:
                        until = row.lease_expires_at.replace(tzinfo=UTC)
                        leases.append((until - datetime.now(UTC)).total_seconds())

        watcher = threading.Thread(target=expirer, daemon=True)
        watcher.start()
        try:
            worker = s.start_worker(
                worker_lease_seconds=1.0,
                worker_metrics_interval_seconds=30.0,  # no metrics write renews it either
                worker_role="training",
            )
            job = wait_status(client, job_id, "succeeded", timeout=120)
            events = [e.message for e in client.iter_events(job_id)]
        finally:
            stop.set()
            watcher.join(timeout=10)
    assert not any("expired" in e.lower() or "queued again" in e for e in events), events
    assert job.status == "succeeded"
    assert worker.lease_seconds >= LEASE_STEPS * STEP_S > 1.0  # sized from the steps
    assert max(leases) > 1.5  # what the database held: longer than the configured 1 s
    assert not any("--lease-seconds" in r.getMessage() for r in caplog.records)
    assert any("leases are now" in r.getMessage() for r in caplog.records)
