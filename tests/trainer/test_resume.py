"""Stop after N steps, resume from the checkpoint on disk, and end with the same weights as
an uninterrupted run (optimizer, schedule, RNG stream and data cursor all restored)."""

from __future__ import annotations

import os

import pytest
import torch
from tiny import tiny_llama
from trainer_helpers import lora_hp, make_job, mixlora_hp, trainer_for

from mixloom.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def _jobs():  # type: ignore[no-untyped-def]
    return [
        make_job(
            "lo",
            lora_hp(batch_size=4, micro_batch_size=2, n_epochs=2, warmup_ratio=0.2),
            seed=1,
            n_rows=6,
        ),
        make_job(
            "mx",
            mixlora_hp(batch_size=3, n_epochs=2, jitter_noise=0.05, lr_scheduler="cosine"),
            seed=2,
            n_rows=7,
        ),
    ]


def _run_to_end(trainer) -> None:  # type: ignore[no-untyped-def]
    while trainer.active:
        trainer.step()


@pytest.mark.parametrize(
    ("recompute", "rng"),
    [(False, "stream"), (True, "stream"), (True, "counter")],  # CPU defaults; GPU defaults
)
def test_resume_from_checkpoint_equals_uninterrupted(
    tmp_path, recompute: bool, rng: str, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    if rng == "counter" and not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "scripts/test.sh sets TRITON_INTERPRET=1"
    monkeypatch.setenv("MIXLOOM_DROPOUT_RNG", rng)
    straight = trainer_for(tiny_llama(), recompute=recompute)
    for job in _jobs():
        straight.add_job(job)
    _run_to_end(straight)

    first = trainer_for(tiny_llama(), recompute=recompute)
    jobs = _jobs()
    for job in jobs:
        first.add_job(job)
    saved = {}
    while len(saved) < len(jobs):  # stop each job at its 3rd step (mid second epoch for "lo")
        first.step()
        for job in jobs:
            if job.step == 3 and job.micro_done == 0 and job.name not in saved:
                saved[job.name] = save_checkpoint(
                    first, job.name, tmp_path / job.name / "step-3", "tiny"
                )
    del first  # the "crash"

    resumed = trainer_for(tiny_llama(), recompute=recompute)
    for job in _jobs():
        ckpt = latest_checkpoint(tmp_path / job.name)
        assert ckpt == saved[job.name]
        resumed.add_job(job, resume=load_checkpoint(ckpt))
        assert job.step == 3
    _run_to_end(resumed)
    for job in _jobs():
        a = straight.model.adapter_state_dict(job.name)
        b = resumed.model.adapter_state_dict(job.name)
        assert straight.jobs[job.name].step == resumed.jobs[job.name].step == job.total_steps
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
