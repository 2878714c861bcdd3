"""Workers that share nothing but Postgres, Redis and an S3 store (a real `moto_server`):
each has its own data directory; training files come from the store, checkpoints go to it
(manifest last) and resumes come back from it, adapters download through the API from it.

- Two tenants' jobs on two `mixloom worker` processes; one is killed (SIGKILL) mid-job, the
  other takes its job over after the lease expires, resumes from the store's checkpoint,
  and the adapters equal an uninterrupted run's.
- The store unreachable at checkpoint time (a loopback proxy in front of moto, closed and
  reopened): the job's checkpointing pauses with an event, training goes on, uploads are
  retried with back-off, and the job succeeds once the store is back.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
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
from s3 import Moto, Proxy, moto_server
from sqlalchemy import func, select

from mixloom.storage import models as m
from mixloom.storage import objects
from mixloom.storage.objects import S3Store

STEPS = 20  # 40 rows, batch_size 2, one epoch


def _spec(name: str, seed: int) -> dict[str, Any]:
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
    return {"name": name, "seed": seed, "method": {"type": "lora", "lora": {"hyperparameters": hp}}}


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[Moto]:
    with moto_server(tmp_path / "moto.log") as server:
        yield server


def _progress(db: Any, job_id: str) -> tuple[int, int]:
    """(highest metric step, highest checkpoint step recorded) of a job."""
    with db.transaction() as s:
        step = s.scalar(select(func.max(m.JobMetric.step)).where(m.JobMetric.job_id == job_id))
        ckpt = s.scalar(select(func.max(m.Checkpoint.step)).where(m.Checkpoint.job_id == job_id))
    return step or 0, ckpt or 0


def _holder(db: Any, job_id: str) -> str | None:
    with db.transaction() as s:
        return s.scalar(select(m.Job.worker_id).where(m.Job.id == job_id))


def _locations(db: Any, job_id: str) -> list[str]:
    with db.transaction() as s:
        rows = list(s.scalars(select(m.Checkpoint.path).where(m.Checkpoint.job_id == job_id)))
        adapter = s.scalar(select(m.Job.adapter_path).where(m.Job.id == job_id))
    return [*rows, adapter]


def test_two_workers_with_their_own_disks_share_only_the_store_and_survive_a_kill(
    tmp_path: Path, tiny_base: Path, pg_url: str, redis: str, moto: Moto
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(2 * STEPS, seed=5))
    specs = [_spec("tenant-a", 3), _spec("tenant-b", 4)]
    store_settings = moto.settings("e2e")
    with stack(tmp_path, tiny_base, database_url=pg_url, redis_url=redis, **store_settings) as s:
        clients = [s.client("store-a"), s.client("store-b")]
        model = clients[0].list_models()[0].id
        ids = []
        for client, spec in zip(clients, specs, strict=True):
            f = client.upload_file(data)
            job = client.create_job(
                training_file=f.id, model=model, method=spec["method"], seed=spec["seed"]
            )
            ids.append(job.id)
        disks = {name: tmp_path / f"disk-{name}" for name in ("w1", "w2")}
        procs = {
            name: s.spawn_worker(name, data_dir=disk, **store_settings)
            for name, disk in disks.items()
        }
        # both jobs pass a checkpoint in the store and train on beyond it
        wait_for(
            lambda: all(
                step >= ck + 2 and ck >= 4 for step, ck in (_progress(s.db, i) for i in ids)
            ),
            timeout=180,
            every=0.02,
        )
        victim = _holder(s.db, ids[0])
        assert victim in procs
        survivor = "w2" if victim == "w1" else "w1"
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(timeout=30)
        _, resumed_from = _progress(s.db, ids[0])
        assert _progress(s.db, ids[0])[0] < STEPS, "finished before the kill"
        done = [
            wait_status(c, i, "succeeded", timeout=240) for c, i in zip(clients, ids, strict=True)
        ]
        assert all(j.trained_tokens for j in done)

        events = [e.message for e in clients[0].iter_events(ids[0], page_size=100)]
        assert any("resuming from the checkpoint" in e for e in events), events
        workers = workers_by_step(s.db, ids[0])
        assert sorted(workers) == list(range(1, STEPS + 1))
        assert {workers[n] for n in range(resumed_from + 1, STEPS + 1)} == {survivor}

        # every stored byte is in the store; the API's data dir holds no job or file bytes
        store = objects.open_store(s.settings)
        assert isinstance(store, S3Store)
        for job_id in ids:
            assert all(p.startswith("s3://e2e/mixloom/jobs/") for p in _locations(s.db, job_id))
        api_disk = s.settings.data_dir
        assert not (api_disk / "jobs").exists()
        assert not list(api_disk.rglob("*.jsonl"))
        # the survivor fetched the victim's job's data into its own disk (its checkpoints,
        # all in the store once the job succeeded, are gone from there)
        assert len(list((disks[survivor] / "files").rglob("*.jsonl"))) == 2
        wait_for(lambda: not (disks[survivor] / "jobs" / ids[0]).exists(), timeout=30)

        reference = train_reference(tmp_path, tiny_base, data, specs)
        for client, job_id, spec in zip(clients, ids, specs, strict=True):
            archive = client.download_adapter(job_id, tmp_path / f"{spec['name']}.zip")
            got = adapter_tensors(archive, tmp_path / f"unzipped-{spec['name']}")
            assert_same_tensors(got, reference[spec["name"]])


def test_store_unreachable_at_checkpoint_time_pauses_checkpointing_not_the_job(
    tmp_path: Path, tiny_base: Path, pg_url: str, redis: str, moto: Moto
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(2 * STEPS, seed=7))
    spec = _spec("outage", 5)
    spec["method"]["lora"]["hyperparameters"]["checkpoint_every"] = 2
    proxy = Proxy(int(moto.url.rsplit(":", 1)[1]))
    try:
        with stack(
            tmp_path, tiny_base, database_url=pg_url, redis_url=redis, **moto.settings("outage")
        ) as s:
            client = s.client("outage")
            f = client.upload_file(data)
            model = client.list_models()[0].id
            job_id = client.create_job(
                training_file=f.id, model=model, method=spec["method"], seed=spec["seed"]
            ).id
            s.start_worker(
                data_dir=tmp_path / "worker-disk",
                s3_endpoint_url=proxy.url,
                storage_retry_seconds=0.2,
                storage_retry_max_seconds=1.0,
            )
            wait_for(lambda: _progress(s.db, job_id)[1] >= 2, timeout=120, every=0.02)
            proxy.close()
            closed_at_ckpt = _progress(s.db, job_id)[1]
            wait_for(
                lambda: any(
                    "Checkpoint upload failed: store unreachable; retrying" in e.message
                    for e in client.iter_events(job_id, page_size=100)
                ),
                timeout=120,
            )
            # training goes on to its last step while the store is away; no checkpoint is
            # recorded meanwhile, and the job waits for the store, neither failed nor paused
            wait_for(lambda: _progress(s.db, job_id)[0] == STEPS, timeout=120)
            time.sleep(1.0)  # a few upload retries
            assert client.get_job(job_id).status == "running"
            assert _progress(s.db, job_id)[1] <= closed_at_ckpt + 2
            proxy.open()
            job = wait_status(client, job_id, "succeeded", timeout=180)
            assert job.trained_tokens
            series = sorted(x.step for x in client.iter_metrics(job_id))
            assert series == list(range(1, STEPS + 1))
            archive = client.download_adapter(job_id, tmp_path / "outage.zip")
            got = adapter_tensors(archive, tmp_path / "unzipped")
            reference = train_reference(tmp_path, tiny_base, data, [spec])
            assert_same_tensors(got, reference["outage"])
            locations = _locations(s.db, job_id)
            assert all(p.startswith("s3://outage/") for p in locations)
            # the store holds exactly the recorded checkpoints: those dropped by retention
            # were deleted, the ones superseded during the outage never stayed
            store = objects.open_store(s.settings)
            assert isinstance(store, S3Store)
            root = f"jobs/{job_id}/checkpoints/"
            stored = {k[len(root) :].split("/")[0] for k in store.list(root)}
            assert stored == {p.rsplit("/", 1)[1] for p in locations}
    finally:
        proxy.close()


def test_a_job_whose_data_cannot_be_fetched_waits_in_the_queue_not_failed(
    tmp_path: Path, tiny_base: Path, pg_url: str, redis: str, moto: Moto
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(8, seed=9))
    spec = _spec("late", 6)
    proxy = Proxy(int(moto.url.rsplit(":", 1)[1]))
    proxy.close()  # the worker's way to the store is down from the start
    try:
        with stack(
            tmp_path, tiny_base, database_url=pg_url, redis_url=redis, **moto.settings("late")
        ) as s:
            client = s.client("late")
            f = client.upload_file(data)
            model = client.list_models()[0].id
            job_id = client.create_job(
                training_file=f.id, model=model, method=spec["method"], seed=spec["seed"]
            ).id
            s.start_worker(
                data_dir=tmp_path / "worker-disk",
                s3_endpoint_url=proxy.url,
                storage_retry_max_seconds=0.5,
            )
            wait_for(
                lambda: any(
                    "object store unreachable while fetching its data" in e.message
                    for e in client.iter_events(job_id, page_size=100)
                ),
                timeout=120,
            )
            assert client.get_job(job_id).status in ("queued", "running")
            proxy.open()
            job = wait_status(client, job_id, "succeeded", timeout=180)
            assert job.trained_tokens
    finally:
        proxy.close()
