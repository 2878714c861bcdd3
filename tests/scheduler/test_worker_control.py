"""Continuous batching and control through HTTP (Postgres, Redis): a job joins running
ones at the next step; pause checkpoints and leaves at once, resume continues exactly;
cancel stops a job while the others go on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
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

from mixloom.clients.errors import ConflictError

HP = dict(r=4, lora_alpha=8, learning_rate=4e-3, warmup_ratio=0.0, max_seq_len=32)


def _lora(name: str, seed: int, **hp: Any) -> dict[str, Any]:
    return {
        "name": name,
        "seed": seed,
        "method": {"type": "lora", "lora": {"hyperparameters": {**HP, **hp}}},
    }


def _mixlora(name: str, seed: int, **hp: Any) -> dict[str, Any]:
    body = {**HP, "num_experts": 4, "top_k": 2, **hp}
    return {
        "name": name,
        "seed": seed,
        "method": {"type": "mixlora", "mixlora": {"hyperparameters": body}},
    }


def test_join_pause_resume_cancel(tmp_path: Path, tiny_base: Path, pg_url: str, redis: str) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(40, seed=9))
    # 60 steps: long enough that the pause below lands mid-run on a fast machine
    a = _lora("a", 21, batch_size=2, n_epochs=3, checkpoint_every=5)
    b = _mixlora("b", 22, batch_size=1, n_epochs=50)  # long; cancelled midway
    c = _lora("c", 23, batch_size=8, max_steps=3, target_modules=["q_proj", "v_proj"])
    with stack(tmp_path, tiny_base, database_url=pg_url, redis_url=redis) as s:
        client = s.client("ctl")
        f = client.upload_file(data)
        model = client.list_models()[0].id

        def submit(spec: dict[str, Any]) -> str:
            job = client.create_job(
                training_file=f.id, model=model, method=spec["method"], seed=spec["seed"]
            )
            return str(job.id)

        ja, jb = submit(a), submit(b)
        s.start_worker()
        wait_for(lambda: len(metrics(client, ja)) >= 2)

        # c joins the running jobs at the next step and trains beside them
        jc = submit(c)
        wait_status(client, jc, "succeeded")
        first = metrics(client, jc)[0].metrics["shared_with"]
        assert first >= 2, first

        # pause a: it checkpoints at an optimizer-step boundary and leaves; b goes on
        client.pause_job(ja)
        paused = wait_status(client, ja, "paused")
        at = metrics(client, ja)[-1].step
        assert at < 60
        assert at in [x.step_number for x in client.iter_checkpoints(ja)]
        assert any(f"paused at step {at}" in e.message for e in client.iter_events(ja))
        steps_b = len(metrics(client, jb))
        wait_for(lambda: len(metrics(client, jb)) > steps_b + 2)
        assert metrics(client, ja)[-1].step == at
        assert paused.queue_position is None

        # cancel b mid-run; resume a, which continues from its pause checkpoint
        client.cancel_job(jb)
        wait_status(client, jb, "cancelled")
        with pytest.raises(ConflictError):
            client.download_adapter(jb, tmp_path / "b.zip")
        client.resume_job(ja)
        wait_status(client, ja, "succeeded")
        after = [x for x in metrics(client, ja) if x.metrics["shared_with"] == 0]
        assert after and after[0].step == at + 1  # alone now: b cancelled, c finished

        reference = train_reference(tmp_path, tiny_base, data, [a, c])
        for name, job_id in (("a", ja), ("c", jc)):
            archive = client.download_adapter(job_id, tmp_path / f"{name}.zip")
            got = adapter_tensors(archive, tmp_path / f"unzipped-{name}")
            assert_same_tensors(got, reference[name])
