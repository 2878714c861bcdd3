"""On a GPU: a fused forward and backward through every adapter layer of the model (attention
LoRA, MixLoRA top-k and top-p experts, the triton backend) queues its work without a single
host sync, checked with torch's sync debug mode set to "error". bench/gpu.sh runs it."""

from __future__ import annotations

import os

import pytest
import torch
from tiny import tiny_llama

from mixloom.model.adapter_model import AdapterModel
from mixloom.model.layers import Segment
from mixloom.model.specs import AdapterSpec, LoraSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
        reason="needs a GPU with compiled triton (bench/gpu.sh)",
    ),
]


def _model(recompute: bool) -> AdapterModel:
    am = AdapterModel(tiny_llama().cuda(), backend="triton", recompute=recompute)
    lora = LoraSpec(r=8, dropout=0.1)
    am.add_adapter(AdapterSpec("plain", kind="lora", lora=lora))
    am.add_adapter(
        AdapterSpec("topk", kind="mixlora", lora=lora, expert=lora, num_experts=4, jitter_noise=0.1)
    )
    am.add_adapter(
        AdapterSpec("topp", kind="mixlora", lora=lora, expert=lora, num_experts=4, routing="top_p")
    )
    return am


@pytest.mark.parametrize("recompute", [True, False])  # the GPU default, and activations kept
def test_fused_forward_backward_never_waits_for_the_gpu(recompute: bool) -> None:
    am = _model(recompute)
    ids = torch.randint(0, 128, (3, 24), device="cuda")
    segments = [Segment("plain", 0, 1), Segment("topk", 1, 2), Segment("topp", 2, 3)]

    def step() -> None:
        hidden = am.model.model(input_ids=ids).last_hidden_state
        aux = sum(am.aux_losses().values())
        (hidden.float().pow(2).mean() + aux).backward()

    with am.fused(segments, None, training=True):
        step()  # compiles the kernels, warms the allocators
    with am.fused(segments, None, training=True):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    grads = [p.grad for _, p in am.named_adapter_parameters("topp")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
