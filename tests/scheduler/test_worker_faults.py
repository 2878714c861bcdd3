"""Faults stay with the job that caused them (issue 14): a full, read-only or over-quota data
directory pauses the job that writes (it resumes once space is back), a job whose step
raises fails alone, the worker keeps serving everyone else; a job that keeps killing its
workers is failed as poisoned; checkpoints are kept to the last K plus the best, sizes
recorded; metrics rows only from the lease holder, one per step after a crash and resume.

Storage-level parts run on SQLite and Postgres; the worker parts on a real stack (API,
SQLite, worker threads) with its data directory on a tmpfs of our own."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from claims import claim
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
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from mixloom.storage import archives, files, jobs, tenants
from mixloom.storage import models as m
from mixloom.storage.db import Database
from mixloom.storage.ids import new_id
from mixloom.storage.records import JobStatus
from mixloom.trainer.checkpoint import STATE_FILE, stored_bytes
from mixloom.trainer.fused import FusedTrainer


def _method(kind: str = "lora", **hp: Any) -> dict[str, Any]:
    base = dict(r=4, lora_alpha=8, learning_rate=3e-3, warmup_ratio=0.0, max_seq_len=32)
    return {"type": kind, kind: {"hyperparameters": {**base, **hp}}}


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at path (root only), unmounted on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def _create(client: Any, data: Path, spec: dict[str, Any]) -> str:
    """A job of `spec` (method, seed; as train_reference takes it) on uploaded `data`."""
    return str(
        client.create_job(
            training_file=client.upload_file(data).id,
            model=client.list_models()[0].id,
            method=spec["method"],
            seed=spec["seed"],
        ).id
    )


def _events(client: Any, job_id: str) -> list[str]:
    return [e.message for e in client.iter_events(job_id, page_size=100)]


def _checkpoint_rows(db: Database, job_id: str) -> list[m.Checkpoint]:
    with db.transaction() as s:
        rows = list(
            s.scalars(select(m.Checkpoint).where(m.Checkpoint.job_id == job_id).order_by("step"))
        )
        s.expunge_all()
    return rows


# --- storage: crash counter, retention, resume ----------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, sqlite_template: Path, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        path = tmp_path / "faults.db"
        path.write_bytes(sqlite_template.read_bytes())
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("pg_url")
    database = Database.connect(url)
    yield database
    database.dispose()


def _queued_job(db: Database) -> str:
    with db.transaction() as s:
        tenant = tenants.create_tenant(session=s, name=new_id("t")).id
        f = files.create_file(
            session=s,
            file_id=files.new_file_id(),
            tenant_id=tenant,
            filename="train.jsonl",
            purpose="fine-tune",
            size=10,
            rows=1,
            sha256="0" * 64,
            path="/nonexistent",
        )
        return jobs.create_job(
            session=s,
            tenant_id=tenant,
            model=new_id("model"),
            training_file_id=f.id,
            validation_file_id=None,
            method=_method(),
            seed=1,
        ).id


def _crash(db: Database, job_id: str, *, checkpoint_at: int | None = None) -> JobStatus:
    """A worker claims the job, maybe checkpoints, then dies: its lease expires."""
    with db.transaction() as s:
        model = jobs.get_job(session=s, job_id=job_id).model
        assert claim(s, model=model, worker="w") is not None
        if checkpoint_at is not None:
            jobs.add_checkpoint(session=s, job_id=job_id, step=checkpoint_at, path="/x.zip")
    later = datetime.now(UTC) + timedelta(hours=1)
    with db.transaction() as s:
        expired = jobs.expire_leases(session=s, max_crashes=3, now=later)
    return {r.id: r.status for r in expired}[job_id]


def test_a_job_that_keeps_crashing_its_worker_is_failed_as_poisoned(db: Database) -> None:
    poison = _queued_job(db)
    assert _crash(db, poison) == JobStatus.QUEUED
    assert _crash(db, poison) == JobStatus.QUEUED
    assert _crash(db, poison) == JobStatus.FAILED
    with db.transaction() as s:
        job = jobs.get_job(session=s, job_id=poison)
        events = [e.message for e in jobs.list_events(session=s, job_id=poison, limit=50)[0]]
    assert job.error is not None and job.error["code"] == "job_poisoned"
    assert "stopped its worker 3 times" in events[0], events
    assert not any("worker w" in e for e in events), events  # tenants never see worker ids

    innocent = _queued_job(db)  # shares crashed workers, but checkpoints between crashes
    for step in range(1, 6):
        assert _crash(db, innocent, checkpoint_at=2 * step) == JobStatus.QUEUED
    with db.transaction() as s:
        assert s.scalar(select(m.Job.crashes).where(m.Job.id == innocent)) == 1


def test_retention_keeps_the_last_k_and_the_best_by_validation_loss(db: Database) -> None:
    job_id = _queued_job(db)
    losses = {1: 2.0, 2: 0.5, 3: 1.0, 4: 0.9, 5: 0.8, 6: 0.7}
    with db.transaction() as s:
        for step, loss in losses.items():
            jobs.add_checkpoint(
                session=s,
                job_id=job_id,
                step=step,
                path=f"/ckpt/step-{step}.zip",
                metrics={"valid_loss": loss},
                bytes=100 * step,
            )
        dropped = jobs.retain_checkpoints(session=s, job_id=job_id, keep_last=2)
    assert sorted(r.step for r in dropped) == [1, 3, 4]
    assert [r.step for r in _checkpoint_rows(db, job_id)] == [2, 5, 6]
    with db.transaction() as s:
        usage = tenants.tenant_usage(
            session=s, tenant_id=jobs.get_job(session=s, job_id=job_id).tenant_id
        )
    assert usage["checkpoint_bytes"] == 200 + 500 + 600


def test_resume_at_deletes_metrics_and_checkpoints_past_the_resume_point(db: Database) -> None:
    job_id = _queued_job(db)
    with db.transaction() as s:
        for step in range(1, 8):
            jobs.add_metrics(session=s, job_id=job_id, step=step, values={"train_loss": 1.0})
        for step in (3, 6):
            jobs.add_checkpoint(session=s, job_id=job_id, step=step, path=f"/step-{step}.zip")
    with db.transaction() as s:
        dropped = jobs.resume_at(session=s, job_id=job_id, step=3)
    assert [r.step for r in dropped] == [6]
    with db.transaction() as s:
        steps = list(s.scalars(select(m.JobMetric.step).where(m.JobMetric.job_id == job_id)))
    assert sorted(steps) == [1, 2, 3]


# --- the worker: storage faults ---------------------------------------------------------------


def test_disk_full_pauses_the_job_that_fills_it_and_the_other_tenant_finishes(
    tmp_path: Path, tiny_base: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(8, seed=1))
    with (
        tmpfs(tmp_path / "data", "4m") as mount,
        stack(tmp_path, tiny_base, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}") as s,
    ):
        small_client, big_client = s.client("small"), s.client("big")
        model = small_client.list_models()[0].id
        small = small_client.create_job(
            training_file=small_client.upload_file(data).id,
            model=model,
            method=_method(batch_size=2, checkpoint_every=1),
        ).id
        # r=256: a checkpoint of about 8 MB, twice what the disk has
        big = big_client.create_job(
            training_file=big_client.upload_file(data).id,
            model=model,
            method=_method(r=256, batch_size=2, checkpoint_every=2),
        ).id
        worker = s.start_worker(worker_max_jobs=4)
        paused = wait_status(big_client, big, "paused")
        assert paused.error is None
        events = _events(big_client, big)
        assert any("storage unavailable" in e and "No space left on device" in e for e in events), (
            events
        )
        assert any("resume it when space is freed" in e for e in events), events
        pause = next(e for e in big_client.iter_events(big) if "storage unavailable" in e.message)
        assert pause.level == "warning"  # a fault the tenant should notice, not routine
        wait_status(small_client, small, "succeeded")
        assert s.threads[0].is_alive() and worker.ready.is_set()
        assert list(mount.glob(f"jobs/{big}/checkpoints/*")) == []  # no partial write left

        _remount(mount, "size=64m")
        big_client.resume_job(big)
        wait_status(big_client, big, "succeeded")
        s.stop_workers()


def test_read_only_data_dir_pauses_running_jobs_and_they_resume_once_writable(
    tmp_path: Path, tiny_base: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(40, seed=2))
    with (
        tmpfs(tmp_path / "data", "64m") as mount,
        stack(tmp_path, tiny_base, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}") as s,
    ):
        client = s.client("ro")
        f = client.upload_file(data)
        model = client.list_models()[0].id
        ids = [
            client.create_job(
                training_file=f.id, model=model, method=_method(batch_size=2, checkpoint_every=2)
            ).id
            for _ in range(2)
        ]
        s.start_worker(worker_max_jobs=4)
        wait_for(lambda: all(metrics(client, i) for i in ids), every=0.02)
        _remount(mount, "ro")
        try:
            for job_id in ids:
                wait_status(client, job_id, "paused")
                assert any("Read-only file system" in e for e in _events(client, job_id))
            assert s.threads[0].is_alive()
        finally:
            _remount(mount, "rw")
        for job_id in ids:
            client.resume_job(job_id)
        for job_id in ids:
            wait_status(client, job_id, "succeeded")
            assert [x.step for x in metrics(client, job_id)] == list(range(1, 21))
        s.stop_workers()


def test_quota_refusal_pauses_the_job_and_it_resumes_when_there_is_room(
    tmp_path: Path, tiny_base: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(8, seed=3))
    with stack(tmp_path, tiny_base) as s:
        client = s.client("quota")
        f = client.upload_file(data)
        with s.db.transaction() as session:
            tenants.set_tenant_quotas(session=session, tenant="quota", max_total_bytes=f.bytes + 1)
        job_id = client.create_job(
            training_file=f.id,
            model=client.list_models()[0].id,
            method=_method(batch_size=2, checkpoint_every=2),
        ).id
        s.start_worker()
        wait_status(client, job_id, "paused")
        events = _events(client, job_id)
        assert any("max_total_bytes" in e and "checkpoint at step 2" in e for e in events)
        assert list(client.iter_checkpoints(job_id)) == []
        with s.db.transaction() as session:
            tenants.set_tenant_quotas(session=session, tenant="quota", max_total_bytes=None)
        client.resume_job(job_id)
        wait_status(client, job_id, "succeeded")


def test_retention_keeps_the_last_k_plus_best_on_disk_and_records_sizes(
    tmp_path: Path, tiny_base: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16, seed=4))
    val = write_jsonl(tmp_path / "val.jsonl", arithmetic_rows(4, seed=5))
    with stack(tmp_path, tiny_base, keep_checkpoints=3) as s:
        client = s.client("keep")
        job_id = client.create_job(
            training_file=client.upload_file(data).id,
            validation_file=client.upload_file(val).id,
            model=client.list_models()[0].id,
            method=_method(batch_size=2, checkpoint_every=1, keep_checkpoints=2),
        ).id
        s.start_worker()
        wait_status(client, job_id, "succeeded")
        rows = _checkpoint_rows(s.db, job_id)
        steps = [r.step for r in rows]
        assert steps[-2:] == [7, 8] and len(steps) in (2, 3), steps
        if len(rows) == 3:  # the best by validation loss, kept beyond the last 2
            assert rows[0].metrics["valid_loss"] <= min(r.metrics["valid_loss"] for r in rows)
        folder = s.settings.data_dir / "jobs" / job_id / "checkpoints"
        kept = sorted(f"step-{n}" for n in steps)  # each a folder, stored once (no zips)
        # files go after the commit that also marks the job succeeded: a moment later
        wait_for(lambda: sorted(p.name for p in folder.iterdir()) == kept, timeout=10)
        assert sorted(p.name for p in (folder.parent).iterdir()) == ["checkpoints"]
        with s.db.transaction() as session:
            job = jobs.get_job(session=session, job_id=job_id)
            assert job.adapter_path is not None
        # the final adapter is the last checkpoint's folder: it counts the adapter files,
        # that checkpoint the trainer state beside them, so every byte counts once
        final = Path(job.adapter_path)
        assert final == folder / "step-8"
        assert job.adapter_bytes == archives.adapter_bytes(final) > 0
        for r in rows:
            path = Path(r.path)
            assert not path.suffix and path.is_dir()
            shared = job.adapter_bytes if path == final else 0
            assert r.bytes == stored_bytes(path) - shared > 0
        usage = client.usage()
        assert usage.checkpoint_bytes + usage.adapter_bytes == stored_bytes(folder)


# --- the worker: a job whose step raises, leases, metrics -------------------------------------


def test_a_job_whose_step_raises_fails_alone(tmp_path: Path, tiny_base: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12, seed=6))
    with stack(tmp_path, tiny_base) as s:
        client = s.client("culprit")
        f = client.upload_file(data)
        model = client.list_models()[0].id
        bad, good = (
            client.create_job(training_file=f.id, model=model, method=_method(batch_size=2)).id
            for _ in range(2)
        )
        collate = FusedTrainer._collate

        def broken(self, batches):  # type: ignore[no-untyped-def]
            if any(job.name == bad for job, _, _ in batches):
                raise RuntimeError("a bug that only this job's data reaches")
            return collate(self, batches)

        monkeypatch.setattr(FusedTrainer, "_collate", broken)
        s.start_worker(worker_max_jobs=4)
        failed = wait_status(client, bad, "failed")
        assert failed.error is not None and failed.error.code == "training_error"
        assert "only this job's data" in failed.error.message
        wait_status(client, good, "succeeded")
        assert [x.step for x in metrics(client, good)] == list(range(1, 7))
        assert s.threads[0].is_alive()


def test_a_worker_that_lost_its_lease_writes_no_metrics_and_a_resume_keeps_one_row_per_step(
    tmp_path: Path, tiny_base: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(40, seed=7))
    with stack(tmp_path, tiny_base) as s:
        client = s.client("lease")
        job_id = client.create_job(
            training_file=client.upload_file(data).id,
            model=client.list_models()[0].id,
            method=_method(batch_size=2, checkpoint_every=3),
        ).id
        s.start_worker()
        wait_for(lambda: len(metrics(client, job_id)) >= 4, every=0.01)
        with s.db.transaction() as session:  # another worker takes the job over
            row = session.scalar(select(m.Job).where(m.Job.id == job_id).with_for_update())
            assert row is not None and row.status == JobStatus.RUNNING.value
            row.worker_id = "another"
            row.lease_expires_at = datetime.now(UTC) + timedelta(hours=1)
            stolen_at = row.last_seq
        wait_for(lambda: not s.workers[0].held, timeout=30)
        with s.db.transaction() as session:
            late = session.scalar(
                select(func.count()).where(
                    m.JobMetric.job_id == job_id, m.JobMetric.seq > stolen_at
                )
            )
        assert late == 0  # the old holder wrote nothing after it lost the lease
        # the other worker dies in turn (kill -9): the job resumes from its last checkpoint
        with s.db.transaction() as session:
            jobs.expire_leases(session=session, now=datetime.now(UTC) + timedelta(hours=2))
        wait_status(client, job_id, "succeeded")
        series = metrics(client, job_id)
        assert [x.step for x in series] == list(range(1, 21))
        assert any("resuming from the checkpoint" in e for e in _events(client, job_id))


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, tiny_base: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24, seed=8))
    spec = {"name": "trunc", "seed": 5, "method": _method(batch_size=2, checkpoint_every=3)}
    with stack(tmp_path, tiny_base) as s:
        client = s.client("trunc")
        job_id = _create(client, data, spec)
        s.start_worker(worker_id="first")
        wait_for(lambda: len(metrics(client, job_id)) >= 7, every=0.01)
        s.stop_workers()  # checkpoints at the current step, queued again
        assert client.get_job(job_id).status == "queued"
        steps = sorted(c.step_number for c in client.iter_checkpoints(job_id))
        latest, previous = steps[-1], steps[-2]
        state = (
            s.settings.data_dir / "jobs" / job_id / "checkpoints" / f"step-{latest}" / STATE_FILE
        )
        state.write_bytes(state.read_bytes()[:64])

        s.start_worker(worker_id="second")
        wait_status(client, job_id, "succeeded")
        events = _events(client, job_id)
        assert any(
            f"checkpoint at step {latest} is corrupt" in e.lower()
            and f"resuming from step {previous}" in e
            for e in events
        ), events
        assert [x.step for x in metrics(client, job_id)] == list(range(1, 13))
        reference = train_reference(tmp_path, tiny_base, data, [spec])
        got = adapter_tensors(client.download_adapter(job_id, tmp_path / "a.zip"), tmp_path / "a")
        assert_same_tensors(got, reference["trunc"])


def test_a_checkpoint_written_but_never_recorded_is_trained_again(
    tmp_path: Path, tiny_base: Path
) -> None:
    """A worker killed between writing a checkpoint and recording it (with its step's
    metrics row): the next one resumes from the last recorded checkpoint, so every step
    has its row and the result equals an uninterrupted run."""
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24, seed=8))
    spec = {"name": "unrec", "seed": 5, "method": _method(batch_size=2, checkpoint_every=3)}
    with stack(tmp_path, tiny_base) as s:
        client = s.client("unrecorded")
        job_id = _create(client, data, spec)
        s.start_worker(worker_id="first")
        wait_for(lambda: len(metrics(client, job_id)) >= 7, every=0.01)
        s.stop_workers()
        steps = sorted(c.step_number for c in client.iter_checkpoints(job_id))
        latest, previous = steps[-1], steps[-2]
        with s.db.transaction() as session:  # as if killed before recording `latest`
            session.execute(
                m.Checkpoint.__table__.delete().where(
                    m.Checkpoint.job_id == job_id, m.Checkpoint.step == latest
                )
            )
            session.execute(
                m.JobMetric.__table__.delete().where(
                    m.JobMetric.job_id == job_id, m.JobMetric.step > previous
                )
            )
        folder = s.settings.data_dir / "jobs" / job_id / "checkpoints" / f"step-{latest}"
        assert folder.is_dir()

        s.start_worker(worker_id="second")
        wait_status(client, job_id, "succeeded")
        events = _events(client, job_id)
        assert any(f"resuming from the checkpoint at step {previous}" in e for e in events)
        assert [x.step for x in metrics(client, job_id)] == list(range(1, 13))
        reference = train_reference(tmp_path, tiny_base, data, [spec])
        got = adapter_tensors(client.download_adapter(job_id, tmp_path / "a.zip"), tmp_path / "a")
        assert_same_tensors(got, reference["unrec"])


def test_a_job_whose_lease_expired_under_its_own_worker_is_claimed_again_and_finishes(
    tmp_path: Path, tiny_base: Path
) -> None:
    """A database outage longer than the lease: the jobs a worker holds are queued again
    (by itself or another process); when it claims one back it drops its stale copy and
    resumes, instead of failing the job as 'already training'."""
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(160, seed=9))
    spec = {"name": "again", "seed": 6, "method": _method(batch_size=2, checkpoint_every=3)}
    with stack(tmp_path, tiny_base) as s:
        client = s.client("expired")
        job_id = _create(client, data, spec)
        worker = s.start_worker(worker_id="only")
        wait_for(lambda: len(metrics(client, job_id)) >= 4, every=0.01)
        # its renewals fail (the database is away) until the lease has run out: then the
        # worker's own expiry pass queues the job again and its next claim takes it back
        worker._renew = lambda job_id: None  # type: ignore[method-assign]  (before a step)
        worker._renew_all = lambda job_ids: None  # type: ignore[method-assign]  (heartbeats)

        def expired_and_queued_again() -> bool:
            # a renewal already under way when they were replaced may still extend the
            # lease, and a fast machine may finish the job before the worker's next expiry
            # pass (one per lease/2): so the lease is run out again, and the pass is made
            # due, until the worker has queued the job again
            if any("queued again" in e.lower() for e in _events(client, job_id)):
                return True
            with s.db.transaction() as session:
                row = session.get(m.Job, job_id)
                assert row is not None and row.status == "running", row and row.status
                assert row.worker_id == "only"
                row.lease_expires_at = datetime.now(UTC) - timedelta(seconds=1)
            worker._last_expire = float("-inf")
            return False

        wait_for(expired_and_queued_again, timeout=60, every=0.2)
        wait_status(client, job_id, "succeeded")
        reference = train_reference(tmp_path, tiny_base, data, [spec])
        got = adapter_tensors(client.download_adapter(job_id, tmp_path / "a.zip"), tmp_path / "a")
        assert_same_tensors(got, reference["again"])
        assert [x.step for x in metrics(client, job_id)] == list(range(1, 81))


def test_metrics_the_database_missed_are_written_once_it_is_back(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's metrics row whose write met a database outage is kept by the worker and
    written with the next one: one row per step in the end, none lost."""
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24, seed=10))
    real = jobs.add_metrics
    failed: list[int] = []

    def flaky(*, session: Any, job_id: str, step: int, values: Any) -> Any:
        if step in (3, 4) and step not in failed:
            failed.append(step)
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        return real(session=session, job_id=job_id, step=step, values=values)

    monkeypatch.setattr(jobs, "add_metrics", flaky)
    with stack(tmp_path, tiny_base) as s:
        client = s.client("outage")
        job_id = client.create_job(
            training_file=client.upload_file(data).id,
            model=client.list_models()[0].id,
            method=_method(batch_size=2),
        ).id
        s.start_worker()
        wait_status(client, job_id, "succeeded")
        assert failed == [3, 4]
        assert [x.step for x in metrics(client, job_id)] == list(range(1, 13))
