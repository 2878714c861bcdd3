"""On a GPU: a fused forward and backward through every adapter layer of the model (attention
LoRA, MixLoRA top-k and top-p experts, the triton backend) queues its work without a single
host sync, checked with torch's sync debug mode set to "error"; and a whole training step,
optimizer steps included, waits for the GPU once, at its end. bench/gpu.sh runs it."""

from __future__ import annotations

import os
import random
import warnings

import pytest
import torch
from tiny import tiny_llama

from mixloom.data.tokenize import EncodedRow
from mixloom.jobspec import LoraHyperparameters, MixLoraHyperparameters
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.batch import Segment
from mixloom.model.specs import AdapterSpec, LoraSpec
from mixloom.trainer.fused import FusedTrainer
from mixloom.trainer.job import TrainingJob

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


def _job(name: str, hp: LoraHyperparameters, seed: int) -> TrainingJob:
    rng = random.Random(seed)
    rows = []
    for _ in range(8):  # one length: no padding (the model code syncs on a padded 2D mask)
        ids = [rng.randrange(1, 128) for _ in range(20)]
        rows.append(EncodedRow(ids, [-100] * 5 + ids[5:]))
    return TrainingJob(
        name, AdapterSpec.from_hyperparameters(name, hp, seed=seed), hp, rows, seed=seed
    )


def test_a_training_step_reads_the_device_once() -> None:
    trainer = FusedTrainer(AdapterModel(tiny_llama().cuda(), backend="triton"), pad_id=0)
    common = dict(r=8, lora_alpha=16, lora_dropout=0.1, batch_size=2, max_grad_norm=0.01)
    trainer.add_job(_job("plain", LoraHyperparameters(**common), seed=1))  # type: ignore[arg-type]
    moe = MixLoraHyperparameters(num_experts=4, top_k=2, **common)  # type: ignore[arg-type]
    trainer.add_job(_job("moe", moe, seed=2))
    trainer.step()  # compiles the kernels, makes the optimizer states
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            report = trainer.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs  # the read of losses, norms and router loads
    assert all(m.stepped and m.grad_norm is not None for m in report.jobs)
