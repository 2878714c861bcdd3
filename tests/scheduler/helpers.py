"""A real stack for worker tests: uvicorn serving the API on a free port, workers as threads
of this process or as `mixloom worker` subprocesses (to kill -9), a tiny base model saved as
a Hugging Face folder, and the `mixloom train` run of the same jobs to compare against."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import uvicorn
from safetensors.torch import load_file

from mixloom.clients import Client
from mixloom.config import Settings
from mixloom.scheduler.worker import Worker
from mixloom.storage import tenants
from mixloom.storage.bus import make_bus
from mixloom.storage.db import Database

REPO = Path(__file__).resolve().parents[2]
FAST = dict(  # worker settings for tests: short leases, every step's metrics persisted
    worker_lease_seconds=2.0,
    worker_poll_seconds=0.2,
    worker_metrics_interval_seconds=0.0,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def arithmetic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short prompt/completion pairs (tiny byte-level tokenizer: one token per byte)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@dataclass
class Stack:
    settings: Settings
    db: Database
    url: str
    tmp: Path
    bus: Any  # the API's bus; in-process workers share it when there is no Redis
    workers: list[Worker] = field(default_factory=list)
    stops: list[threading.Event] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def client(self, tenant: str) -> Client:
        with self.db.transaction() as session:
            t = tenants.create_tenant(session=session, name=tenant)
            _, key = tenants.create_api_key(session=session, tenant_id=t.id)
        return Client(self.url, api_key=key, timeout=30)

    def start_worker(self, base: Any = None, **options: Any) -> Worker:
        """A worker thread in this process (the same Worker `mixloom worker` runs);
        `options`: Settings' worker_* fields."""
        given = {**FAST, "worker_id": f"thread-{len(self.workers)}", **options}
        settings = self.settings.model_copy(update=given)
        bus = make_bus(self.settings.redis_url) if self.settings.redis_url else self.bus
        worker = Worker(settings, db=self.db, bus=bus, base=base)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        assert worker.ready.wait(120), "worker did not start"
        self.workers.append(worker)
        self.stops.append(stop)
        self.threads.append(thread)
        return worker

    def stop_workers(self) -> None:
        for stop in self.stops:
            stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def spawn_worker(self, name: str, **options: Any) -> subprocess.Popen[bytes]:
        """`mixloom worker` as a subprocess (its log goes to tmp/<name>.log)."""
        env = dict(os.environ)
        env.update(
            {
                "MIXLOOM_DATA_DIR": str(self.settings.data_dir),
                "MIXLOOM_DATABASE_URL": self.settings.resolved_database_url,
                "MIXLOOM_BASE_MODEL": self.settings.base_model,
                "MIXLOOM_DEVICE": "cpu",
                "MIXLOOM_KERNEL_BACKEND": "torch",
                "OMP_NUM_THREADS": "1",  # tiny models: threads only contend
            }
        )
        if self.settings.redis_url:
            env["MIXLOOM_REDIS_URL"] = self.settings.redis_url
        for key, value in {**FAST, "worker_id": name, **options}.items():
            env[f"MIXLOOM_{key.upper()}"] = str(value)
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "mixloom.cli", "worker", "--no-migrate"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.procs.append(proc)
        return proc

    def kill_procs(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)


@contextmanager
def stack(tmp: Path, base_model: Path, **settings: Any) -> Iterator[Stack]:
    from mixloom.server.app import create_app
    from mixloom.storage import migrate

    cfg = Settings(
        data_dir=tmp / "data",
        base_model=str(base_model),
        device="cpu",
        kernel_backend="torch",
        **settings,
    )
    migrate.upgrade(cfg.resolved_database_url)
    db = Database.connect(cfg.resolved_database_url)
    bus = make_bus(cfg.redis_url)
    app = create_app(cfg, db=db, bus=bus)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    s = Stack(settings=cfg, db=db, url=f"http://127.0.0.1:{port}", tmp=tmp, bus=bus)
    try:
        yield s
    finally:
        s.kill_procs()
        s.stop_workers()
        server.should_exit = True
        thread.join(timeout=15)
        db.dispose()


def wait_for(pred: Callable[[], Any], timeout: float = 120, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(every)


def wait_status(client: Client, job_id: str, *statuses: str, timeout: float = 120) -> Any:
    def check() -> Any:
        job = client.get_job(job_id)
        if job.status in ("failed",) and "failed" not in statuses:
            raise AssertionError(f"{job_id} failed: {job.error}")
        return job if job.status in statuses else None

    return wait_for(check, timeout)


def metrics(client: Client, job_id: str) -> list[Any]:
    return list(client.iter_metrics(job_id))


def workers_by_step(db: Database, job_id: str) -> dict[int, str]:
    """Which worker trained each step, from the stored metrics (the API never says)."""
    from mixloom.storage import jobs

    with db.transaction() as session:
        series, _ = jobs.list_metrics(session=session, job_id=job_id, limit=100_000)
    return {r.step: r.values["worker_id"] for r in series}


def adapter_tensors(zip_path: Path, into: Path) -> dict[str, torch.Tensor]:
    """Unzip an adapter archive (files at its root) and read its safetensors."""
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        assert all("/" not in n for n in names), names
        zf.extractall(into)
    return load_file(str(into / "adapter_model.safetensors"))


def train_reference(
    tmp: Path, base_model: Path, data: Path, jobs: list[dict[str, Any]]
) -> dict[str, dict[str, torch.Tensor]]:
    """The same jobs through `mixloom train` (fused, one process): adapter tensors by name."""
    import yaml

    from mixloom.trainer.run import train

    folder = tmp / "reference"
    folder.mkdir(exist_ok=True)
    config = {
        "base_model": str(base_model),
        "output_dir": str(folder / "runs"),
        "device": "cpu",
        "kernel_backend": "torch",
        "jobs": [{"training_file": str(data), **j} for j in jobs],  # a job may name its own
    }
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    statuses = train(path, progress=False)
    assert set(statuses.values()) == {"succeeded"}, statuses
    return {
        j["name"]: load_file(str(folder / "runs" / j["name"] / "adapter_model.safetensors"))
        for j in jobs
    }


def assert_same_tensors(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5
) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-4), (
            k,
            float((a[k] - b[k]).abs().max()),
        )
