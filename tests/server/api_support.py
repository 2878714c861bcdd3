"""Helpers for the API tests: the app under test and a stand-in for the worker."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from claims import claim
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mixloom.config import Settings
from mixloom.server.app import create_app
from mixloom.server.deps import ServerContext
from mixloom.storage import jobs, tenants
from mixloom.storage.ids import new_id
from mixloom.storage.records import JobRecord, JobStatus

MODEL = "smollm2-135m"
GOOD_JSONL = b'{"prompt": "2+2=", "completion": "4"}\n{"prompt": "3+3=", "completion": "6"}\n'
LORA = {"type": "lora", "lora": {"hyperparameters": {"r": 4, "n_epochs": 1}}}


@dataclass
class Api:
    """A running app plus helpers that act as admin and as the worker (through storage)."""

    client: TestClient
    app: FastAPI
    settings: Settings

    @property
    def ctx(self) -> ServerContext:
        ctx: ServerContext = self.app.state.ctx
        return ctx

    def tenant(self, **quotas: int) -> dict[str, str]:
        """A new tenant; returns its auth headers."""
        with self.ctx.db.transaction() as s:
            t = tenants.create_tenant(session=s, name=new_id("tenant"), **quotas)
            _, key = tenants.create_api_key(session=s, tenant_id=t.id)
        return {"Authorization": f"Bearer {key}"}

    def upload(self, headers: dict[str, str], data: bytes = GOOD_JSONL, **kw: Any) -> Any:
        return self.client.post(
            "/v1/files",
            headers=headers,
            files={"file": (kw.pop("filename", "train.jsonl"), data)},
            data={"purpose": kw.pop("purpose", "fine-tune")},
            **kw,
        )

    def file_id(self, headers: dict[str, str]) -> str:
        r = self.upload(headers)
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    def create_job(self, headers: dict[str, str], file_id: str, **body: Any) -> Any:
        payload = {"model": MODEL, "training_file": file_id, "method": LORA, **body}
        return self.client.post("/v1/fine_tuning/jobs", headers=headers, json=payload)

    def job_id(self, headers: dict[str, str], file_id: str | None = None) -> str:
        r = self.create_job(headers, file_id or self.file_id(headers))
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    # --- the worker, played through the storage functions it will call ---

    def claim(self, job_id: str, worker: str = "worker-1") -> JobRecord:
        """Claim `job_id`; other tests' leftover jobs (shared Postgres) are put back."""
        others: list[JobRecord] = []
        try:
            while True:
                with self.ctx.db.transaction() as s:
                    got = claim(s, model=MODEL, worker=worker, lease_seconds=60)
                assert got is not None, f"job {job_id} was not claimable"
                if got.id == job_id:
                    return got
                others.append(got)
        finally:
            with self.ctx.db.transaction() as s:
                for o in others:
                    jobs.release_job(
                        session=s, job_id=o.id, worker_id=worker, status=JobStatus.QUEUED
                    )

    def publish_since(self, job_id: str, after_seq: int) -> None:
        with self.ctx.db.transaction() as s:
            rows = jobs.progress_since(session=s, job_id=job_id, after_seq=after_seq)
        for r in rows:
            self.ctx.bus.publish(job_id, r.to_message())

    def write_zip(self, name: str) -> str:
        path = self.settings.data_dir / "adapters" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("adapter_config.json", '{"peft_type": "LORA"}')
            z.writestr("adapter_model.safetensors", b"\0" * 16)
        path.write_bytes(buf.getvalue())
        return str(path)


def make_api(tmp_path: Path, url: str, redis: str | None, **overrides: Any) -> Iterator[Api]:
    settings = Settings(
        **{
            "data_dir": tmp_path / "data",
            "database_url": url,
            "redis_url": redis,
            "base_model": MODEL,
            "sse_poll_seconds": 0.2,
            **overrides,
        }
    )
    app = create_app(settings)
    with TestClient(app) as client:
        yield Api(client=client, app=app, settings=settings)
