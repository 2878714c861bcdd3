"""A real uvicorn serving the mixloom API on a free localhost port, for client, CLI and
browser tests: real HTTP, real SQLite database, real migrations, no mocks."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from mixloom.config import Settings
from mixloom.storage import tenants
from mixloom.storage.db import Database

# 20 prompt/completion rows
TRAIN_ROWS = b"".join(
    b'{"prompt": "%d+%d=", "completion": "%d"}\n' % (a, b, a + b)
    for a in range(4)
    for b in range(5)
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    settings: Settings
    db: Database
    app: Any

    def new_key(self, name: str) -> str:
        """A new tenant and its API key."""
        with self.db.transaction() as session:
            tenant = tenants.create_tenant(session=session, name=name)
            _, key = tenants.create_api_key(session=session, tenant_id=tenant.id)
        return key


@contextmanager
def serve_asgi(app: Any, port: int | None = None) -> Iterator[str]:
    """Run `app` under uvicorn in a thread; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextmanager
def live_api(data_dir: Path, **settings: Any) -> Iterator[LiveServer]:
    """The API alone (no worker): jobs stay queued."""
    from mixloom.server.app import create_app

    cfg = Settings(data_dir=data_dir, **settings)
    app = create_app(cfg, run_migrations=True)
    db = Database.connect(cfg.resolved_database_url)
    try:
        with serve_asgi(app) as url:
            yield LiveServer(url=url, settings=cfg, db=db, app=app)
    finally:
        db.dispose()


class ScriptedWorker:
    """Drives one job through the worker's real lease protocol without training: claims
    it, writes one metric a tick (published on the app's bus, as a worker does), honours
    cancel/pause, then saves a checkpoint and an adapter zip and succeeds. For fast client
    and dashboard tests; the real worker on a tiny model is tested beside these."""

    def __init__(
        self,
        server: LiveServer,
        *,
        steps: int = 8,
        tick: float = 0.25,
        shared_with: int = 1,
    ) -> None:
        self.server = server
        self.shared_with = shared_with  # how many jobs it claims to share steps with
        self.steps = steps
        self.tick = tick
        self.worker_id = "scripted-worker"
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.finished: dict[str, str] = {}

    def _publish(self, job_id: str, after_seq: int) -> None:
        from mixloom.storage import jobs

        bus = self.server.app.state.ctx.bus
        with self.server.db.transaction() as session:
            for record in jobs.progress_since(session=session, job_id=job_id, after_seq=after_seq):
                bus.publish(job_id, record.to_message())

    def _seq(self, job_id: str) -> int:
        from mixloom.storage import jobs

        with self.server.db.transaction() as session:
            return jobs.get_job(session=session, job_id=job_id).last_seq

    def run_job(self, job_id: str) -> str:
        """Train `job_id` (already queued) to its end; returns the final status."""
        import io
        import json
        import math
        import zipfile
        from datetime import UTC, datetime, timedelta

        from mixloom.storage import jobs, models
        from mixloom.storage.records import JobStatus, RequestedAction

        db = self.server.db
        seq = self._seq(job_id)
        # a worker's claim takes a queued job of any tenant; tests share one server, so
        # this job is leased directly (status event included) instead.
        with db.transaction() as session:
            claimed = jobs.set_job_status(
                session=session,
                job_id=job_id,
                status=JobStatus.RUNNING,
                message=f"Job started by worker {self.worker_id} (attempt 1)",
            )
            row = session.get(models.Job, job_id)
            assert row is not None
            row.worker_id = self.worker_id
            row.started_at = datetime.now(UTC)
            row.lease_expires_at = datetime.now(UTC) + timedelta(seconds=30)
        self._publish(job_id, seq)
        out = self.server.settings.data_dir / "adapters"
        out.mkdir(parents=True, exist_ok=True)
        mixlora = claimed.method["type"] == "mixlora"

        def archive(name: str) -> str:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as z:
                z.writestr("adapter_config.json", json.dumps({"peft_type": "LORA", "r": 8}))
                z.writestr("adapter_model.safetensors", b"\0" * 64)
            path = out / name
            path.write_bytes(buf.getvalue())
            return str(path)

        status = JobStatus.SUCCEEDED
        for step in range(1, self.steps + 1):
            if self.stop.wait(self.tick):
                status = JobStatus.QUEUED
                break
            seq = self._seq(job_id)
            with db.transaction() as session:
                job = jobs.renew_lease(
                    session=session, job_id=job_id, worker_id=self.worker_id, lease_seconds=30
                )
                if job.requested_action is not None:
                    status = (
                        JobStatus.CANCELLED
                        if job.requested_action == RequestedAction.CANCEL
                        else JobStatus.PAUSED
                    )
                    break
                # The names and units the real worker writes (trainer/session.py).
                values = {
                    "train_loss": 2.5 * math.exp(-step / 4) + 0.3,
                    "learning_rate": 2e-4 * (1 - step / (self.steps + 1)),
                    "tokens_per_second": 1000.0 + 10 * step,
                    "trained_tokens": 64 * step,
                    "total_steps": self.steps,
                    "eta_seconds": (self.steps - step) * self.tick,
                    "gpu_peak_memory_bytes": 300 * 1024 * 1024,
                    "shared_with": self.shared_with,
                }
                if mixlora:
                    values["router_load"] = [0.3, 0.25, 0.25, 0.2]
                if step % 4 == 0:
                    values["valid_loss"] = 2.7 * math.exp(-step / 4) + 0.35
                jobs.add_metrics(session=session, job_id=job_id, step=step, values=values)
                if step == self.steps // 2:
                    jobs.add_checkpoint(
                        session=session,
                        job_id=job_id,
                        step=step,
                        path=archive(f"{job_id}-step-{step}.zip"),
                        metrics={"train_loss": values["train_loss"]},
                    )
            self._publish(job_id, seq)
        seq = self._seq(job_id)
        with db.transaction() as session:
            if status == JobStatus.SUCCEEDED:
                jobs.set_adapter_path(
                    session=session,
                    job_id=job_id,
                    path=archive(f"{job_id}-final.zip"),
                    trained_tokens=64 * self.steps,
                )
            jobs.release_job(
                session=session, job_id=job_id, worker_id=self.worker_id, status=status
            )
        self._publish(job_id, seq)
        self.finished[job_id] = status.value
        return status.value

    def start(self, job_id: str) -> threading.Thread:
        self.thread = threading.Thread(target=self.run_job, args=(job_id,), daemon=True)
        self.thread.start()
        return self.thread

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
