"""The invariant everything rests on: jobs trained fused equal each job trained alone."""

from __future__ import annotations

import os

import pytest
import torch
from tiny import tiny_llama
from trainer_helpers import lora_hp, make_job, mixlora_hp, trainer_for

from mixloom.trainer.job import TrainingState


def _weights(trainer, name):  # type: ignore[no-untyped-def]
    return trainer.model.adapter_state_dict(name)


def _assert_same(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def _jobs():  # type: ignore[no-untyped-def]
    return [
        make_job(
            "lora-a", lora_hp(r=4, batch_size=4, micro_batch_size=2, learning_rate=4e-3), seed=1
        ),
        make_job(
            "moe-b",
            mixlora_hp(num_experts=4, top_k=2, batch_size=3, learning_rate=6e-3, jitter_noise=0.05),
            seed=2,
        ),
        make_job(
            "moe-c",
            mixlora_hp(
                r=8,
                num_experts=3,
                routing="switch",
                batch_size=2,
                learning_rate=3e-3,
                target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                expert_lora={"r": 4, "lora_alpha": 16, "lora_dropout": 0.2},
                lr_scheduler="cosine",
                warmup_ratio=0.2,
            ),
            seed=3,
        ),
    ]


def _alone(job, steps):  # type: ignore[no-untyped-def]
    trainer = trainer_for(tiny_llama())
    trainer.add_job(job)
    while trainer.active and job.step < steps:
        trainer.step()
    return _weights(trainer, job.name)


@pytest.mark.parametrize("rng", ["stream", "counter"])  # dropout bits: the CPU's, the GPU's
def test_fused_equals_separate_with_accumulation_and_a_late_joiner(
    rng: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if rng == "counter" and not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "scripts/test.sh sets TRITON_INTERPRET=1"
    monkeypatch.setenv("MIXLOOM_DROPOUT_RNG", rng)
    steps = 3
    fused = trainer_for(tiny_llama())
    a, b, c = _jobs()
    fused.add_job(a)
    fused.add_job(b)
    for _ in range(2):  # c joins after two fused steps
        fused.step()
    fused.add_job(c)
    while fused.active:
        reports = fused.step()
        assert {m.name for m in reports.jobs} <= {"lora-a", "moe-b", "moe-c"}
        for job in list(fused.active):
            if job.step >= steps:
                job.state = TrainingState.SUCCEEDED
    assert a.step == b.step == c.step == steps
    changed = _weights(fused, "lora-a")
    assert any(float(v.abs().sum()) > 0 for k, v in changed.items() if "lora_B" in k)
    for job in _jobs():
        _assert_same(_weights(fused, job.name), _alone(job, steps))


def test_poisoned_job_fails_alone() -> None:
    steps = 3
    fused = trainer_for(tiny_llama())
    good = make_job("good", mixlora_hp(), seed=4)
    bad = make_job("bad", lora_hp(learning_rate=10.0, max_grad_norm=None), seed=5)
    fused.add_job(good)
    fused.add_job(bad)
    with torch.no_grad():  # poison: the bad job's weights hold a NaN from the start
        next(iter(fused.model.adapter_parameters("bad"))).view(-1)[0] = float("nan")
    while fused.active and good.step < steps:
        fused.step()
    assert bad.state == TrainingState.FAILED
    assert "nan" in (bad.error or "").lower()
    _assert_same(_weights(fused, "good"), _alone(make_job("good", mixlora_hp(), seed=4), steps))


def test_a_job_whose_gradients_blow_up_keeps_its_weights_and_fails_alone() -> None:
    """Its loss is finite, so nothing is known before the optimizer step; the step is queued
    with the norm check on the device and must leave the job's weights as they were."""
    steps = 2
    fused = trainer_for(tiny_llama())
    good = make_job("good", mixlora_hp(), seed=4)
    bad = make_job("bad", lora_hp(), seed=5)
    fused.add_job(good)
    fused.add_job(bad)
    before = _weights(fused, "bad")
    first = next(iter(fused.model.adapter_parameters("bad")))
    first.register_hook(lambda g: g + float("inf"))
    while fused.active and good.step < steps:
        report = fused.step()
    assert bad.state == TrainingState.FAILED
    assert "gradient norm became" in (bad.error or "")
    state = bad.optimizer.state[first]  # made at the step, then left as it was made
    assert bad.step == 0 and float(state["step"]) == 0 and not state["exp_avg"].any()
    _assert_same(_weights(fused, "bad"), before, atol=0.0)
    assert [m.name for m in report.jobs] == ["good"]
    _assert_same(_weights(fused, "good"), _alone(make_job("good", mixlora_hp(), seed=4), steps))


def test_running_out_of_memory_for_the_moments_updates_no_job() -> None:
    """Jobs step one after another inside a fused step; the first step of each also makes
    its AdamW moments. An out-of-memory there must find no job updated yet, so that the
    whole step can be undone (FusedTrainer.rollback, tests/trainer/test_rollback.py) and
    retried."""
    fused = trainer_for(tiny_llama())
    first, second = make_job("first", lora_hp(), seed=1), make_job("second", lora_hp(), seed=2)
    fused.add_job(first)
    fused.add_job(second)
    before = _weights(fused, "first")
    real = second.optimizer.step

    def no_memory(*args: object, **kw: object) -> object:
        if not second.optimizer.state:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kw)

    second.optimizer.step = no_memory  # type: ignore[method-assign]
    with pytest.raises(torch.OutOfMemoryError):
        fused.step()
    _assert_same(_weights(fused, "first"), before, atol=0.0)
