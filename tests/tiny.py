"""Tiny random LLaMA models for tests (2 layers, hidden 64): well under a second each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def tiny_llama(seed: int = 0, **overrides):  # type: ignore[no-untyped-def]
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float()
    model.eval()
    return model


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


def save_tiny_base(folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny LLaMA + byte-level chat tokenizer saved as a HF folder (what a user points
    base_model at); vocabulary sized to the tokenizer. `overrides`: LlamaConfig fields (a
    base of another shape)."""
    folder = Path(folder)
    tok = tiny_tokenizer(TURN_TEMPLATE)
    model = tiny_llama(seed, vocab_size=len(tok), **overrides)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
