"""Jobs in storage on both backends: the API-side state machine, the worker's lease
protocol (claim, renew, release, expiry), events/metrics sequence numbers, quotas."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from claims import claim

from mixloom.errors import ObjectNotFoundError, StateConflictError
from mixloom.storage import files, jobs, tenants
from mixloom.storage.db import Database
from mixloom.storage.ids import new_id
from mixloom.storage.jobs import LeaseLostError
from mixloom.storage.objects import LocalStore
from mixloom.storage.records import JobRecord, JobStatus, RequestedAction

METHOD = {"type": "lora", "lora": {"hyperparameters": {"r": 4}}}


def _tenant(db: Database, **quotas: int) -> str:
    with db.transaction() as s:
        return tenants.create_tenant(session=s, name=new_id("t"), **quotas).id


def _job(db: Database, tenant_id: str, model: str | None = None) -> JobRecord:
    """A queued job on a model of its own unless given: claims in one test (filtered by
    model) never take another test's jobs from the shared Postgres database."""
    with db.transaction() as s:
        f = files.create_file(
            session=s,
            file_id=files.new_file_id(),
            tenant_id=tenant_id,
            filename="train.jsonl",
            purpose="fine-tune",
            size=10,
            rows=1,
            sha256="0" * 64,
            path="/nonexistent",
        )
        return jobs.create_job(
            session=s,
            tenant_id=tenant_id,
            model=model or new_id("model"),
            training_file_id=f.id,
            validation_file_id=None,
            method=METHOD,
            seed=1,
        )


def _claim(
    db: Database,
    model: str,
    worker: str = "w1",
    *,
    limit: int = 1,
    default_max_running: int | None = None,
) -> list[JobRecord]:
    """Up to `limit` jobs, claimed as a worker claims them (every job fits)."""
    claimed: list[JobRecord] = []
    with db.transaction() as s:
        while len(claimed) < limit and (
            got := claim(s, model=model, worker=worker, default_max_running=default_max_running)
        ):
            claimed.append(got)
    return claimed


def test_lifecycle_queued_running_succeeded(db: Database) -> None:
    tenant = _tenant(db)
    job = _job(db, tenant)
    assert job.status == JobStatus.QUEUED and job.queued_at is not None
    [claimed] = _claim(db, job.model)
    assert claimed.id == job.id and claimed.status == JobStatus.RUNNING
    assert claimed.worker_id == "w1" and claimed.attempts == 1
    assert _claim(db, job.model) == []
    with db.transaction() as s:
        renewed = jobs.renew_lease(session=s, job_id=job.id, worker_id="w1", lease_seconds=60)
        assert renewed.lease_expires_at > claimed.lease_expires_at  # type: ignore[operator]
        m1 = jobs.add_metrics(session=s, job_id=job.id, step=1, values={"train_loss": 2.5})
        ev = jobs.add_event(session=s, job_id=job.id, message="epoch 1 done")
        ck = jobs.add_checkpoint(session=s, job_id=job.id, step=1, path="/tmp/ck.zip")
        m2 = jobs.add_metrics(session=s, job_id=job.id, step=2, values={"train_loss": 2.0})
        jobs.set_adapter_path(
            session=s, job_id=job.id, path="/tmp/a.zip", fine_tuned_model="ft:x", trained_tokens=99
        )
        done = jobs.release_job(
            session=s, job_id=job.id, worker_id="w1", status=JobStatus.SUCCEEDED
        )
    assert done.status == JobStatus.SUCCEEDED and done.finished_at is not None
    assert done.worker_id is None and done.lease_expires_at is None
    assert done.adapter_path == "/tmp/a.zip" and done.trained_tokens == 99
    assert m1.seq < ev.seq < m2.seq
    with db.transaction() as s:
        replay = jobs.progress_since(session=s, job_id=job.id, after_seq=0)
        seqs = [r.seq for r in replay]
        assert seqs == list(range(1, len(seqs) + 1))
        after = jobs.progress_since(session=s, job_id=job.id, after_seq=m1.seq)
        assert after[0].seq == m1.seq + 1
        metrics, more = jobs.list_metrics(session=s, job_id=job.id)
        assert [m.step for m in metrics] == [1, 2] and not more
        ckpts, _ = jobs.list_checkpoints(session=s, job_id=job.id)
        assert [c.id for c in ckpts] == [ck.id]
        statuses = [
            e.data["status"]
            for e in jobs.list_events(session=s, job_id=job.id, limit=100)[0]
            if e.type == "status" and e.data
        ]
    assert statuses[::-1] == ["queued", "running", "succeeded"]


def test_claim_is_exclusive_under_concurrency(db: Database) -> None:
    tenant = _tenant(db)
    model = new_id("model")
    mine = {_job(db, tenant, model).id for _ in range(8)}
    taken: dict[str, list[str]] = {}
    barrier = threading.Barrier(3)

    def worker(name: str) -> None:
        barrier.wait()
        got: list[str] = []
        while batch := _claim(db, model, worker=name):
            got += [j.id for j in batch]
        taken[name] = got

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_taken = [j for ids in taken.values() for j in ids]
    assert sorted(all_taken) == sorted(mine)  # each job claimed exactly once


def test_claim_respects_running_cap_and_model(db: Database) -> None:
    tenant = _tenant(db, max_running_jobs=1)
    model = new_id("model")
    first, second = _job(db, tenant, model), _job(db, tenant, model)
    assert [j.id for j in _claim(db, model, default_max_running=5, limit=5)] == [first.id]
    assert _claim(db, model, default_max_running=5) == []  # the tenant is at its limit
    assert _claim(db, new_id("model")) == []
    with db.transaction() as s:
        jobs.release_job(
            session=s,
            job_id=first.id,
            worker_id="w1",
            status=JobStatus.FAILED,
            error={"message": "boom", "code": "x", "param": None},
        )
    assert [j.id for j in _claim(db, model, default_max_running=5)] == [second.id]


def test_api_transitions(db: Database) -> None:
    tenant = _tenant(db)
    job = _job(db, tenant)
    with db.transaction() as s:
        paused = jobs.pause_job(session=s, job_id=job.id, tenant_id=tenant)
        assert paused.status == JobStatus.PAUSED
        assert jobs.pause_job(session=s, job_id=job.id, tenant_id=tenant).status == "paused"
    assert _claim(db, job.model) == []  # paused jobs are not claimed
    with db.transaction() as s:
        resumed = jobs.resume_job(session=s, job_id=job.id, tenant_id=tenant)
        assert resumed.status == JobStatus.QUEUED
        assert jobs.queue_position(session=s, job=resumed) is not None
    assert len(_claim(db, job.model)) == 1
    with db.transaction() as s:
        asked = jobs.pause_job(session=s, job_id=job.id, tenant_id=tenant)
        assert (asked.status, asked.requested_action) == (JobStatus.RUNNING, RequestedAction.PAUSE)
        withdrawn = jobs.resume_job(session=s, job_id=job.id, tenant_id=tenant)
        assert withdrawn.requested_action is None
        cancel = jobs.cancel_job(session=s, job_id=job.id, tenant_id=tenant)
        assert cancel.requested_action == RequestedAction.CANCEL
        with pytest.raises(StateConflictError):
            jobs.pause_job(session=s, job_id=job.id, tenant_id=tenant)
        beat = jobs.renew_lease(session=s, job_id=job.id, worker_id="w1", lease_seconds=30)
        assert beat.requested_action == RequestedAction.CANCEL  # the worker sees it
        done = jobs.release_job(
            session=s, job_id=job.id, worker_id="w1", status=JobStatus.CANCELLED
        )
        assert done.status == JobStatus.CANCELLED and done.requested_action is None
        assert jobs.cancel_job(session=s, job_id=job.id, tenant_id=tenant).status == "cancelled"
        for action in (jobs.pause_job, jobs.resume_job):
            with pytest.raises(StateConflictError):
                action(session=s, job_id=job.id, tenant_id=tenant)
    other = _tenant(db)
    with db.transaction() as s, pytest.raises(ObjectNotFoundError):
        jobs.cancel_job(session=s, job_id=job.id, tenant_id=other)


def test_expired_lease_requeues_at_old_place_and_lost_worker_is_refused(db: Database) -> None:
    tenant = _tenant(db)
    model = new_id("model")
    job, cancelled = _job(db, tenant, model), _job(db, tenant, model)
    assert len(_claim(db, model, limit=2)) == 2
    with db.transaction() as s:
        jobs.cancel_job(session=s, job_id=cancelled.id, tenant_id=tenant)
    later = datetime.now(UTC) + timedelta(seconds=120)
    with db.transaction() as s:
        expired = {j.id: j for j in jobs.expire_leases(session=s, now=later)}
    assert expired[job.id].status == JobStatus.QUEUED
    assert expired[job.id].queued_at == job.queued_at  # keeps its place
    assert expired[cancelled.id].status == JobStatus.CANCELLED
    with db.transaction() as s, pytest.raises(LeaseLostError):
        jobs.renew_lease(session=s, job_id=job.id, worker_id="w1", lease_seconds=30)
    [again] = _claim(db, model, worker="w2")
    assert again.id == job.id and again.attempts == 2 and again.worker_id == "w2"
    with db.transaction() as s, pytest.raises(LeaseLostError):
        jobs.release_job(session=s, job_id=job.id, worker_id="w1", status=JobStatus.SUCCEEDED)


def test_one_heartbeat_renews_every_held_lease_and_names_the_lost_ones(db: Database) -> None:
    tenant = _tenant(db)
    model = new_id("model")
    mine = [_job(db, tenant, model) for _ in range(3)]
    claimed = _claim(db, model, limit=3)
    assert {j.id for j in claimed} == {j.id for j in mine}
    other = _job(db, tenant, model)
    [theirs] = _claim(db, model, worker="w2")
    assert theirs.id == other.id
    lost = claimed[1].id  # w1 lets one go (as an expiry would) and w2 takes it
    with db.transaction() as s:
        jobs.release_job(session=s, job_id=lost, worker_id="w1", status=JobStatus.QUEUED)
    [again] = _claim(db, model, worker="w2")
    assert again.id == lost
    ids = [j.id for j in mine] + [other.id]
    with db.transaction() as s:
        renewed = jobs.renew_leases(session=s, job_ids=ids, worker_id="w1", lease_seconds=600)
    assert set(renewed) == set(ids)
    assert renewed[lost] is None and renewed[other.id] is None  # w2's: never renewed by w1
    for j in claimed:
        if j.id != lost:
            r = renewed[j.id]
            assert r is not None and r.worker_id == "w1"
            assert r.lease_expires_at > j.lease_expires_at  # type: ignore[operator]
    with db.transaction() as s:  # w2's leases were left as they were
        beat = jobs.renew_lease(session=s, job_id=lost, worker_id="w2", lease_seconds=30)
    assert beat.worker_id == "w2"


def test_queue_position_follows_claim_order(db: Database) -> None:
    tenant = _tenant(db)
    a, b = _job(db, tenant), _job(db, tenant)
    with db.transaction() as s:
        pa = jobs.queue_position(session=s, job=jobs.get_job(session=s, job_id=a.id))
        pb = jobs.queue_position(session=s, job=jobs.get_job(session=s, job_id=b.id))
    assert pa is not None and pb == pa + 1


def test_usage_counts_for_quotas(db: Database) -> None:
    tenant = _tenant(db)
    model = new_id("model")
    _job(db, tenant, model)
    _job(db, tenant, model)
    _claim(db, model)
    with db.transaction() as s:
        usage = tenants.tenant_usage(session=s, tenant_id=tenant)
    assert usage == {
        "stored_bytes": 20,
        "file_bytes": 20,
        "checkpoint_bytes": 0,
        "adapter_bytes": 0,
        "waiting_jobs": 1,
        "running_jobs": 1,
    }


def test_file_in_use_cannot_be_deleted(db: Database) -> None:
    tenant = _tenant(db)
    job = _job(db, tenant)
    with db.transaction() as s, pytest.raises(StateConflictError):
        files.delete_file(session=s, file_id=job.training_file_id, tenant_id=tenant)
    with db.transaction() as s:
        jobs.cancel_job(session=s, job_id=job.id, tenant_id=tenant)
        files.delete_file(session=s, file_id=job.training_file_id, tenant_id=tenant)
        with pytest.raises(ObjectNotFoundError):
            files.get_file(session=s, file_id=job.training_file_id, tenant_id=tenant)
        assert tenants.tenant_usage(session=s, tenant_id=tenant)["stored_bytes"] == 0


# --- a final adapter shares its last checkpoint's folder: each byte counted once ---------


def _succeeded_sharing_a_folder(db: Database, root) -> tuple[str, str, object]:  # type: ignore[no-untyped-def]
    """A succeeded job whose adapter is its last checkpoint's folder (as the worker stores
    it): the adapter counts its 110 bytes of adapter files, the checkpoint its 325 bytes of
    trainer state."""
    tenant = _tenant(db)
    job = _job(db, tenant)
    _claim(db, job.model)
    folder = root / "step-2"
    folder.mkdir()
    for name, size in [
        ("adapter_config.json", 10),
        ("adapter_model.safetensors", 100),
        ("trainer_state.pt", 300),
        ("progress.json", 5),
        ("manifest.json", 20),
    ]:
        (folder / name).write_bytes(b"x" * size)
    with db.transaction() as s:
        jobs.add_checkpoint(session=s, job_id=job.id, step=2, path=str(folder), bytes=325)
        jobs.set_adapter_path(session=s, job_id=job.id, path=str(folder), bytes=110)
        jobs.release_job(session=s, job_id=job.id, worker_id="w1", status=JobStatus.SUCCEEDED)
    return tenant, job.id, folder


def _usage(db: Database, tenant: str) -> tuple[int, int]:
    with db.transaction() as s:
        u = tenants.tenant_usage(session=s, tenant_id=tenant)
    return u["checkpoint_bytes"], u["adapter_bytes"]


def test_deleting_the_shared_final_checkpoint_keeps_the_adapter(db: Database, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tenant, job_id, folder = _succeeded_sharing_a_folder(db, tmp_path)
    assert _usage(db, tenant) == (325, 110)
    with db.transaction() as s:
        removed = jobs.delete_checkpoints(session=s, job_id=job_id, tenant_id=tenant)
    jobs.remove_stored_files((c.path for c in removed), store=LocalStore(tmp_path))
    assert [c.bytes for c in removed] == [325]
    assert sorted(p.name for p in folder.iterdir()) == [  # the adapter is whole
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert _usage(db, tenant) == (0, 110)
    with db.transaction() as s:
        path, freed = jobs.delete_adapter(session=s, job_id=job_id, tenant_id=tenant)
    assert (path, freed) == (str(folder), 110)
    jobs.remove_stored_files([path], store=LocalStore(tmp_path))
    assert not folder.exists() and _usage(db, tenant) == (0, 0)


def test_deleting_the_shared_adapter_leaves_its_bytes_to_the_checkpoint(
    db: Database, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    tenant, job_id, folder = _succeeded_sharing_a_folder(db, tmp_path)
    with db.transaction() as s:
        path, freed = jobs.delete_adapter(session=s, job_id=job_id, tenant_id=tenant)
    assert (path, freed) == (None, 0)  # the checkpoint still holds those files
    assert len(list(folder.iterdir())) == 5 and _usage(db, tenant) == (435, 0)
    with db.transaction() as s:
        events = jobs.list_events(session=s, job_id=job_id, limit=5)[0]
        assert "stay with the checkpoint at step 2" in events[0].message
        removed = jobs.delete_checkpoints(session=s, job_id=job_id, tenant_id=tenant)
    assert [c.bytes for c in removed] == [435]
    jobs.remove_stored_files((c.path for c in removed), store=LocalStore(tmp_path))
    assert not folder.exists() and _usage(db, tenant) == (0, 0)
