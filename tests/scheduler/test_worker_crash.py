"""Crash safety with real `mixloom worker` processes on Postgres and Redis: kill -9 one
mid-job; another takes the jobs over once the leases expire, resumes them from their last
checkpoints and finishes them, equal to an uninterrupted run; no job runs on two workers
at once."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from helpers import (
    adapter_tensors,
    arithmetic_rows,
    assert_same_tensors,
    stack,
    train_reference,
    wait_for,
    wait_status,
    workers_by_step,
    write_jsonl,
)
from sqlalchemy import func, select

from mixloom.storage import models as m


def _jobs(n_rows: int) -> list[dict[str, Any]]:
    hp = dict(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        max_seq_len=32,
        batch_size=2,
        checkpoint_every=4,
    )
    return [
        {
            "name": "crash-lora",
            "seed": 3,
            "method": {"type": "lora", "lora": {"hyperparameters": hp}},
        },
        {
            "name": "crash-moe",
            "seed": 4,
            "method": {
                "type": "mixlora",
                "mixlora": {"hyperparameters": {**hp, "num_experts": 4, "top_k": 2}},
            },
        },
    ]


def _progress(db: Any, job_id: str) -> tuple[int, int]:
    """(highest metric step, highest checkpoint step) of a job, read from the database."""
    with db.transaction() as s:
        step = s.scalar(select(func.max(m.JobMetric.step)).where(m.JobMetric.job_id == job_id))
        ckpt = s.scalar(select(func.max(m.Checkpoint.step)).where(m.Checkpoint.job_id == job_id))
    return step or 0, ckpt or 0


def _holder(db: Any, job_id: str) -> str:
    with db.transaction() as s:
        worker = s.scalar(select(m.Job.worker_id).where(m.Job.id == job_id))
    assert worker in ("w1", "w2"), worker
    return str(worker)


def test_kill_9_worker_mid_job_another_resumes_and_result_equals_uninterrupted(
    tmp_path: Path, tiny_base: Path, pg_url: str, redis: str
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(60, seed=5))
    jobs = _jobs(60)
    with stack(tmp_path, tiny_base, database_url=pg_url, redis_url=redis) as s:
        client = s.client("crash")
        f = client.upload_file(data)
        model = client.list_models()[0].id
        ids = [
            client.create_job(
                training_file=f.id, model=model, method=j["method"], seed=j["seed"]
            ).id
            for j in jobs
        ]
        procs = {"w1": s.spawn_worker("w1"), "w2": s.spawn_worker("w2")}
        # both jobs pass a checkpoint and train on beyond it
        wait_for(
            lambda: all(step >= ck + 2 and ck >= 4 for step, ck in map(_progress, [s.db] * 2, ids)),
            timeout=180,
            every=0.02,
        )
        holders = {i: _holder(s.db, i) for i in ids}
        victim = holders[ids[0]]
        survivor = "w2" if victim == "w1" else "w1"
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(timeout=30)
        killed_at = time.time()
        before = {i: _progress(s.db, i) for i in ids}
        assert all(step < 30 for step, _ in before.values()), "finished before the kill"
        done = [wait_status(client, i, "succeeded", timeout=240) for i in ids]

        for job_id, job in zip(ids, done, strict=True):
            events = [e.message for e in client.iter_events(job_id, page_size=100)]
            series = sorted(client.iter_metrics(job_id), key=lambda x: (x.created_at, x.step))
            worker_of = workers_by_step(s.db, job_id)
            workers = [worker_of[x.step] for x in series]
            if holders[job_id] != victim:  # the survivor's own job: one run, one attempt
                assert set(workers) == {survivor}
                assert [x.step for x in series] == list(range(1, 31))
                continue
            assert any("stopped heartbeating" in e for e in events), events
            assert any("started by a worker (attempt 2)" in e for e in events), events
            assert any("resuming from the checkpoint" in e for e in events), events
            # one run per worker, never interleaved: the victim until the kill, then the other
            first = workers.index(survivor)
            assert set(workers[:first]) == {victim} and set(workers[first:]) == {survivor}
            assert all(x.created_at <= killed_at + 1 for x in series[:first])
            # the survivor resumed at the step after the victim's last checkpoint
            _, ckpt = before[job_id]
            steps = [x.step for x in series[first:]]
            assert steps == list(range(ckpt + 1, 31))
            # the victim's steps past its checkpoint were deleted when the job resumed
            assert [x.step for x in series] == list(range(1, 31))
            assert job.trained_tokens and job.trained_tokens > 0

        reference = train_reference(tmp_path, tiny_base, data, jobs)
        for job_id, spec in zip(ids, jobs, strict=True):
            archive = client.download_adapter(job_id, tmp_path / f"{spec['name']}.zip")
            got = adapter_tensors(archive, tmp_path / f"unzipped-{spec['name']}")
            assert_same_tensors(got, reference[spec["name"]])


def test_two_workers_share_the_queue_and_never_train_one_job_together(
    tmp_path: Path, tiny_base: Path, pg_url: str, redis: str
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12, seed=6))
    method = {"type": "lora", "lora": {"hyperparameters": {"batch_size": 2, "max_seq_len": 32}}}
    with stack(tmp_path, tiny_base, database_url=pg_url, redis_url=redis) as s:
        clients = [s.client(f"share-{i}") for i in range(2)]
        files = [c.upload_file(data) for c in clients]
        model = clients[0].list_models()[0].id
        s.start_worker(worker_id="left", worker_max_jobs=3)
        s.start_worker(worker_id="right", worker_max_jobs=3)
        ids = [
            (c, c.create_job(training_file=f.id, model=model, method=method).id)
            for c, f in zip(clients, files, strict=True)
            for _ in range(4)
        ]
        for c, job_id in ids:
            wait_status(c, job_id, "succeeded")
        used = set()
        for c, job_id in ids:
            with s.db.transaction() as session:
                attempts = session.scalar(select(m.Job.attempts).where(m.Job.id == job_id))
            assert attempts == 1
            series = list(c.iter_metrics(job_id))
            workers = set(workers_by_step(s.db, job_id).values())
            assert len(workers) == 1 and [x.step for x in series] == list(range(1, 7))
            used |= workers
        assert used == {"left", "right"}  # both took part
