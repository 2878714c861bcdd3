"""Fair share, memory admission and out-of-memory back-off, through HTTP on the embedded
default stack (SQLite, in-process bus, worker thread in the API's process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from helpers import (
    adapter_tensors,
    arithmetic_rows,
    assert_same_tensors,
    metrics,
    stack,
    train_reference,
    wait_for,
    wait_status,
    write_jsonl,
)

from mixloom.jobspec import LoraHyperparameters
from mixloom.scheduler import memory
from mixloom.storage import jobs as job_store

HP = dict(r=4, lora_alpha=8, learning_rate=4e-3, warmup_ratio=0.0, max_seq_len=64)


def _method(**hp: Any) -> dict[str, Any]:
    return {"type": "lora", "lora": {"hyperparameters": {**HP, **hp}}}


def _started(s: Any, job_id: str) -> Any:
    with s.db.transaction() as session:
        return job_store.get_job(session=session, job_id=job_id).started_at


def _finished(s: Any, job_id: str) -> Any:
    with s.db.transaction() as session:
        return job_store.get_job(session=session, job_id=job_id).finished_at


def _steps_between(client: Any, job_id: str, start: Any, end: Any) -> int:
    """Steps of `job_id` recorded between two datetimes (metrics carry whole seconds)."""
    lo, hi = int(start.timestamp()), int(end.timestamp()) + 1
    return sum(lo <= m.created_at <= hi for m in metrics(client, job_id))


def test_one_tenants_many_jobs_do_not_starve_another(tmp_path: Path, tiny_base: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))
    with stack(tmp_path, tiny_base) as s:
        busy, quiet = s.client("busy"), s.client("quiet")
        fb, fq = busy.upload_file(data), quiet.upload_file(data)
        model = busy.list_models()[0].id
        many = [
            busy.create_job(training_file=fb.id, model=model, method=_method(max_steps=3)).id
            for _ in range(4)
        ]
        one = quiet.create_job(training_file=fq.id, model=model, method=_method(max_steps=3)).id
        # its fair-share round: the first (the busy tenant's other jobs count for nothing)
        assert quiet.get_job(one).queue_position == 1
        assert [busy.get_job(j).queue_position for j in many] == [1, 2, 3, 4]
        s.start_worker(worker_max_jobs=2)
        for job_id in [*many, one]:
            wait_status(busy if job_id in many else quiet, job_id, "succeeded")
        # the quiet tenant's job took the second slot, ahead of the busy tenant's 2nd-4th
        assert _started(s, one) < min(_started(s, j) for j in many[1:])


def test_each_step_gives_every_tenant_a_turn_within_the_token_budget(
    tmp_path: Path, tiny_base: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))
    with stack(tmp_path, tiny_base) as s:
        busy, quiet = s.client("busy"), s.client("quiet")
        fb, fq = busy.upload_file(data), quiet.upload_file(data)
        model = busy.list_models()[0].id
        many = [
            busy.create_job(
                training_file=fb.id, model=model, method=_method(batch_size=2, max_steps=30)
            ).id
            for _ in range(3)
        ]
        one = quiet.create_job(
            training_file=fq.id, model=model, method=_method(batch_size=2, max_steps=6)
        ).id
        # about 28 tokens a row: two jobs of 2 rows fit in 140 padded tokens, three do not
        s.start_worker(worker_step_token_budget=140)
        wait_status(quiet, one, "succeeded")
        shared = [m.metrics["shared_with"] for m in metrics(quiet, one)]
        assert shared == [1] * 6, shared  # a count: never which job, it is another tenant's
        # the busy tenant's jobs took turns beside it: each trained while it did
        ran = (_started(s, one), _finished(s, one))
        assert all(_steps_between(busy, j, *ran) > 0 for j in many)
        for job_id in many:
            busy.cancel_job(job_id)


def test_memory_admission_queues_what_does_not_fit_and_refuses_what_never_will(
    tmp_path: Path, tiny_base: Path
) -> None:
    from transformers import AutoConfig

    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))
    small = dict(batch_size=2, max_steps=4)
    hp = LoraHyperparameters(**{**HP, **small})  # type: ignore[arg-type]
    config = AutoConfig.from_pretrained(tiny_base)
    base_bytes = _safetensors_bytes(tiny_base)
    shape = memory.ModelShape.from_config(config, dtype_bytes=4, base_bytes=base_bytes)
    state = memory.job_state_bytes(shape, hp)
    # room for one small job and half another's state: the second must wait for the first
    budget = base_bytes + memory.step_bytes_upper_bound(shape, hp) + int(1.5 * state)
    with stack(tmp_path, tiny_base) as s:
        client = s.client("mem")
        f = client.upload_file(data)
        model = client.list_models()[0].id
        first = client.create_job(training_file=f.id, model=model, method=_method(**small)).id
        second = client.create_job(training_file=f.id, model=model, method=_method(**small)).id
        huge = client.create_job(
            training_file=f.id, model=model, method=_method(max_seq_len=256, batch_size=64)
        ).id
        s.start_worker(worker_memory_budget_gb=budget / memory.GIB)
        failed = wait_status(client, huge, "failed")
        assert failed.error.code == "job_too_large"
        assert "memory budget" in failed.error.message
        wait_status(client, first, "succeeded")
        wait_status(client, second, "succeeded")
        events = [e.message for e in client.iter_events(second, page_size=100)]
        assert any("is full: waiting for memory" in e for e in events), events
        assert _started(s, second) > _started(s, first)
        assert all(m.metrics["shared_with"] == 0 for m in metrics(client, second))


def _safetensors_bytes(folder: Path) -> int:
    from safetensors.torch import load_file

    return sum(
        t.numel() * t.element_size() for t in load_file(folder / "model.safetensors").values()
    )


def test_out_of_memory_backs_off_and_retries_without_losing_a_job(
    tmp_path: Path, tiny_base: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))
    specs = [
        {"name": "x", "seed": 5, "method": _method(batch_size=4, micro_batch_size=2, max_steps=4)},
        {"name": "y", "seed": 6, "method": _method(batch_size=2, max_steps=5)},
    ]
    with stack(tmp_path, tiny_base) as s:
        worker = s.start_worker()
        real_step = worker.training.trainer.step
        calls = {"n": 0}

        def flaky_step(names: Any = None) -> Any:
            calls["n"] += 1
            if calls["n"] in (2, 5):  # mid-accumulation of x, and later again
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_step(names)

        worker.training.trainer.step = flaky_step  # type: ignore[method-assign]
        client = s.client("oom")
        f = client.upload_file(data)
        model = client.list_models()[0].id
        ids = {
            spec["name"]: client.create_job(
                training_file=f.id, model=model, method=spec["method"], seed=spec["seed"]
            ).id
            for spec in specs
        }
        for job_id in ids.values():
            wait_status(client, job_id, "succeeded")
        assert calls["n"] >= 5
        events = [e.message for e in client.iter_events(ids["x"], page_size=100)]
        assert any("Out of memory" in e and "retrying" in e for e in events), events
        wait_for(lambda: worker.token_budget < worker.settings.worker_step_token_budget)
        reference = train_reference(tmp_path, tiny_base, data, specs)
        for name, job_id in ids.items():
            archive = client.download_adapter(job_id, tmp_path / f"{name}.zip")
            got = adapter_tensors(archive, tmp_path / f"unzipped-{name}")
            assert_same_tensors(got, reference[name])
