"""A live API server (real uvicorn on a free port, SQLite, no worker) shared by the client
and CLI tests; each test signs in as a tenant of its own."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import TRAIN_ROWS, LiveServer, ScriptedWorker, live_api

from mixloom.cli import main
from mixloom.clients import Client
from mixloom.model_ids import fine_tuned_model_id, served_base_id
from mixloom.storage import jobs

_names = itertools.count()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_api(tmp_path_factory.mktemp("api")) as srv:
        yield srv


@pytest.fixture
def api_key(server: LiveServer) -> str:
    return server.new_key(f"tenant-{next(_names)}")


@pytest.fixture
def client(server: LiveServer, api_key: str) -> Iterator[Client]:
    with Client(server.url, api_key, max_retries=1, backoff=0.05) as c:
        yield c


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_bytes(TRAIN_ROWS)
    return path


@pytest.fixture
def finish(server: LiveServer) -> Callable[[str], str]:
    """Train a job with the scripted worker (4 steps, a checkpoint at step 2) and record the
    fine-tuned model the real worker would name; returns its id."""

    def run(job_id: str) -> str:
        assert ScriptedWorker(server, steps=4, tick=0.01).run_job(job_id) == "succeeded"
        with server.db.transaction() as session:
            job = jobs.get_job(session=session, job_id=job_id)
            name = fine_tuned_model_id(
                base=served_base_id(server.settings),
                org=job.tenant_id,
                suffix=job.suffix,
                job_id=job.id,
            )
            jobs.set_adapter_path(
                session=session, job_id=job_id, path=str(job.adapter_path), fine_tuned_model=name
            )
        return name

    return run


@pytest.fixture
def cli(server: LiveServer, api_key: str, capsys: pytest.CaptureFixture[str], monkeypatch: Any):  # type: ignore[no-untyped-def]
    """Runs `mixloom ARGS` in this process; returns (exit status, stdout, stderr)."""
    monkeypatch.setenv("MIXLOOM_BASE_URL", server.url)
    monkeypatch.setenv("MIXLOOM_API_KEY", api_key)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run
