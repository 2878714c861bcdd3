"""The whole fused step with the triton backend (interpreter on CPU) and with the torch backend
(grouped_mm) equals the reference backend (a per-group loop): forward, every gradient, and
the optimizer's result."""

from __future__ import annotations

import os

import pytest
import torch
from tiny import tiny_llama
from trainer_helpers import lora_hp, make_job, mixlora_hp, trainer_for

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="triton on CPU needs TRITON_INTERPRET=1 (scripts/test.sh sets it)",
)


def _jobs():  # type: ignore[no-untyped-def]
    return [
        make_job("lo", lora_hp(r=4, batch_size=2, lora_dropout=0.0), seed=1, n_rows=4),
        make_job(
            "mx",
            mixlora_hp(num_experts=3, top_k=2, batch_size=2, lora_dropout=0.1),
            seed=2,
            n_rows=4,
        ),
        make_job(
            "sw",
            mixlora_hp(r=8, num_experts=2, routing="switch", batch_size=2, expert_lora={"r": 4}),
            seed=3,
            n_rows=4,
        ),
    ]


def test_backends_step_equal_reference_backend() -> None:
    results = {}
    for backend in ("reference", "torch", "triton"):
        trainer = trainer_for(tiny_llama(), backend=backend)
        for job in _jobs():
            trainer.add_job(job)
        for _ in range(2):
            trainer.step()
        results[backend] = {n: trainer.model.adapter_state_dict(n) for n in ("lo", "mx", "sw")}
    for backend in ("torch", "triton"):
        for name, ref in results["reference"].items():
            for k, v in ref.items():
                torch.testing.assert_close(
                    results[backend][name][k], v, atol=1e-5, rtol=1e-4, msg=f"{backend} {name} {k}"
                )
