"""A fused step that runs out of memory part way is undone by `rollback(names)`: retried,
it gives what an uninterrupted run gives (counters, dropout stream, weights)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny import tiny_llama
from trainer_helpers import lora_hp, make_job, mixlora_hp, trainer_for

from mixloom.trainer.fused import FusedTrainer
from mixloom.trainer.job import TrainingJob


def _jobs() -> list[TrainingJob]:
    """Dropout in both, MixLoRA jitter, and gradient accumulation in the first job (two
    micro-batches a step: the out-of-memory error comes in the second)."""
    return [
        make_job("acc", lora_hp(batch_size=4, micro_batch_size=2, lora_dropout=0.2), seed=1),
        make_job("mx", mixlora_hp(batch_size=3, jitter_noise=0.05), seed=2, n_rows=9),
    ]


def _run(trainer: FusedTrainer) -> None:
    while trainer.active:
        trainer.step()


def test_rollback_after_out_of_memory_then_retry_equals_uninterrupted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    straight = trainer_for(tiny_llama())
    for job in _jobs():
        straight.add_job(job)
    _run(straight)

    trainer = trainer_for(tiny_llama())
    for job in _jobs():
        trainer.add_job(job)
    acc = trainer.jobs["acc"]
    real_clip = trainer._clip
    state: dict[str, Any] = {}

    def clip(job: TrainingJob) -> torch.Tensor:
        # at the end of "acc"'s 2nd step, first in the batch: no job has updated yet, and
        # the step has drawn dropout bits and gradients for both of its micro-batches
        if job.name == "acc" and job.step == 1 and job.micro_done == 1 and not state:
            state["raised"] = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_clip(job)

    monkeypatch.setattr(trainer, "_clip", clip)
    trainer.step()  # "acc": step 1 (2 micro-batches); "mx": step 1
    trainer.step()
    at_start = (acc.step, acc.tokens_seen, trainer.model.generators["acc"].get_state())
    trainer.step()  # "acc": the 1st micro-batch of step 2
    assert acc.micro_done == 1 and acc.tokens_seen > at_start[1]
    with pytest.raises(torch.OutOfMemoryError):
        trainer.step()
    trainer.rollback(["acc"])

    assert (acc.step, acc.micro_done, acc.loss_sum, acc.tokens_seen) == (1, 0, 0.0, at_start[1])
    assert torch.equal(trainer.model.generators["acc"].get_state(), at_start[2])
    assert all(p.grad is None for p in trainer.model.adapter_parameters("acc"))
    _run(trainer)
    for name, job in trainer.jobs.items():
        done = straight.jobs[name]
        assert (job.step, job.tokens_seen, job.epoch) == (done.step, done.tokens_seen, done.epoch)
        a = straight.model.adapter_state_dict(name)
        b = trainer.model.adapter_state_dict(name)
        for k in a:  # the retry runs "acc" alone where it first shared a batch with "mx"
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
