"""Shared fixtures: tiny random LLaMA models that run in well under a second."""

from __future__ import annotations

import pytest


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


@pytest.fixture
def tiny_model():  # type: ignore[no-untyped-def]
    return tiny_llama()
