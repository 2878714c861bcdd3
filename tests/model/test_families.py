"""LLaMA-family layouts (LLaMA, Mistral, Qwen2, Gemma): the injected layers keep the base's
output exactly while adapters are zero-initialised, and a fused step trains on each."""

from __future__ import annotations

import pytest
import torch

from mixloom.model.adapter_model import AdapterModel
from mixloom.model.base import prepare_base
from mixloom.model.batch import Segment
from mixloom.model.specs import AdapterSpec, LoraSpec

SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _model(family: str):  # type: ignore[no-untyped-def]
    import transformers as tf

    cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
    }[family]
    extra = {"head_dim": 16} if family.startswith("gemma") else {}
    torch.manual_seed(0)
    return cls[1](cls[0](**SMALL, **extra)).float().eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma"])
def test_family_forward_and_fused_step(family: str) -> None:
    hf = _model(family)
    prepare_base(hf, None, family, torch.device("cpu"))
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = hf(input_ids=ids).logits
    model = AdapterModel(hf)
    model.add_adapter(AdapterSpec("lo", kind="lora", lora=LoraSpec(r=4)))
    model.add_adapter(AdapterSpec("mx", kind="mixlora", lora=LoraSpec(r=4), num_experts=3))
    segs = [Segment("lo", 0, 1), Segment("mx", 1, 3)]
    with torch.no_grad(), model.fused(segs, None, training=False):
        torch.testing.assert_close(model.model(input_ids=ids).logits, base, atol=1e-5, rtol=1e-5)
    with model.fused(segs, None, training=True):
        loss = model.model(input_ids=ids, labels=ids).loss + sum(model.aux_losses().values())
    loss.backward()
    for name in ("lo", "mx"):
        grads = [p.grad for p in model.adapter_parameters(name)]
        assert all(g is not None for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in hf.parameters() if not p.requires_grad)


def test_unsupported_architecture_is_a_clear_error() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from mixloom.errors import ModelLoadError

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ModelLoadError, match="model type 'gpt2' is not supported"):
        prepare_base(gpt2, None, "gpt2", torch.device("cpu"))


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2"])
def test_trainer_loss_equals_the_models_own(family: str) -> None:
    """The fused vocabulary projection + cross-entropy gives the loss the model itself defines,
    including Gemma 2's soft-capped logits (final_logit_softcapping), on target positions only."""
    from mixloom.trainer.fused import FusedTrainer

    hf = _model(family)
    prepare_base(hf, None, family, torch.device("cpu"))
    if family == "gemma2":  # a cap low enough to change these small random logits clearly
        hf.config.final_logit_softcapping = 0.5
    trainer = FusedTrainer(AdapterModel(hf), pad_id=0)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt: no loss there
    with torch.no_grad():
        logits = hf(input_ids=ids).logits.float()
        want = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1), reduction="sum"
        )
        hidden = hf.model(input_ids=ids).last_hidden_state
        got = trainer._token_loss_sum(hidden, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
