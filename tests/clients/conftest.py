"""A live API server (real uvicorn on a free port, SQLite, no worker) shared by the client
and CLI tests; each test signs in as a tenant of its own."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import TRAIN_ROWS, LiveServer, live_api

from mixloom.clients import Client

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
