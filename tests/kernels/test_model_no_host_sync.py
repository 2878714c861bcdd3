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


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("recompute", [True, False])  # the GPU default, and activations kept
def test_fused_forward_backward_never_waits_for_the_gpu(recompute: bool, padded: bool) -> None:
    am = _model(recompute)
    ids = torch.randint(0, 128, (3, 24), device="cuda")
    segments = [Segment("plain", 0, 1), Segment("topk", 1, 2), Segment("topp", 2, 3)]
    host_mask = torch.ones(3, 24, dtype=torch.long)
    host_mask[1, 17:] = 0  # a MixLoRA job's row is padded: its masks and routing skip pads
    mask = host_mask.cuda() if padded else None
    # The model gets its 4D mask ready-made: building one from a padded 2D mask, the model
    # code itself asks the GPU whether any token is padded (a sync that is not mixloom's).
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    mask_4d = (causal[None, None] & host_mask.bool()[:, None, None, :]).cuda() if padded else None

    def step() -> None:
        hidden = am.model.model(input_ids=ids, attention_mask=mask_4d).last_hidden_state
        aux = sum(am.aux_losses().values())
        (hidden.float().pow(2).mean() + aux).backward()

    # the trainer hands the layers the host's copy of the mask (FusedState.begin)
    kw = dict(training=True, host_mask=host_mask if padded else None)
    with am.fused(segments, mask, **kw):  # type: ignore[arg-type]
        step()  # compiles the kernels, warms the allocators
    with am.fused(segments, mask, **kw):  # type: ignore[arg-type]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    grads = [p.grad for _, p in am.named_adapter_parameters("topp")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
