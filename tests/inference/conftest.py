"""A tiny base folder and its exported adapters, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from infer_helpers import SPECS, export_adapters
from tiny import save_tiny_base


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("infer") / "base")


@pytest.fixture(scope="session")
def adapter_dirs(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_adapters(base_dir, tmp_path_factory.mktemp("adapters"), SPECS)
