"""The whole fused step with the triton backend (interpreter on CPU) and with the torch backend
(grouped_mm) equals the reference backend (a per-group loop): forward, every gradient, and
the optimizer's result."""

from __future__ import annotations

import os

import torch
from needs import missing
from tiny import tiny_llama
from trainer_helpers import three_kinds, trainer_for

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    missing("triton on CPU needs TRITON_INTERPRET=1 (scripts/test.sh sets it)")


def _jobs():  # type: ignore[no-untyped-def]
    return three_kinds(lora_dropout=0.0)


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
