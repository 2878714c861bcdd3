"""Worker fixtures: a tiny base model folder (Postgres and Redis: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import save_tiny_base


@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    """A tiny LLaMA + tokenizer as a HF folder; a path of its own per test, so workers of
    one test never claim another test's jobs (workers claim only their model's jobs)."""
    return save_tiny_base(tmp_path / "tiny-base")
