"""The engine's paged attention runs each LLaMA-family layout as transformers does: greedy
decoding of a batch equals `generate` of each prompt alone, and each token's logprob is the
model's, with Mistral's and Gemma 2's sliding windows (set short here, so the prompts pass
them), Gemma 2's score and logit soft-capping and Qwen 2's attention biases."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import prompt
from tiny import tiny_tokenizer

from mixloom.inference import EngineConfig, InferenceEngine, SamplingParams
from mixloom.model.adapter_model import AdapterModel

SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,  # logits far enough apart that no argmax is a near tie
)
EXTRA = {
    "llama": {},
    "mistral": {"sliding_window": 6},
    "qwen2": {},
    "gemma": {"head_dim": 16},
    "gemma2": {
        "head_dim": 16,
        "sliding_window": 6,
        "attn_logit_softcapping": 0.1,  # small enough to bite at this scale
        "final_logit_softcapping": 1.0,
    },
}


def _model(family: str):  # type: ignore[no-untyped-def]
    import transformers as tf

    cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
    }[family]
    attention = "eager" if family == "gemma2" else "sdpa"  # transformers' only for Gemma 2
    torch.manual_seed(0)
    return cls[1](cls[0](**SMALL, **EXTRA[family], attn_implementation=attention)).float().eval()


@pytest.mark.parametrize("family", list(EXTRA))
def test_greedy_batch_equals_transformers_generate(family: str) -> None:
    prompts = [prompt(i, n, vocab=96) for i, n in enumerate((11, 3, 20))]
    engine = InferenceEngine(
        AdapterModel(_model(family)),
        tiny_tokenizer(),
        lambda _: None,
        EngineConfig(max_batch_tokens=8, max_running=4, max_n=2, kv_cache_tokens=512),
    )
    handles = [
        engine.submit("base", p, SamplingParams(max_tokens=10, temperature=0, logprobs=0))
        for p in prompts
    ]
    while engine.has_work:
        engine.step()
    ref = _model(family)
    eos = sorted(engine.eos_ids)
    for p, handle in zip(prompts, handles, strict=True):
        choice = handle.result().choices[0]
        with torch.no_grad():
            out = ref.generate(
                torch.tensor([p]),
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
            )
            assert choice.token_ids == out[0, len(p) :].tolist()
            logp = ref(input_ids=out).logits[0, len(p) - 1 : -1].log_softmax(-1)
        assert choice.logprobs is not None
        got = torch.tensor([lp.logprob for lp in choice.logprobs])
        want = logp.gather(-1, torch.tensor(choice.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
