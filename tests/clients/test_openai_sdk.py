"""The official `openai` package, unchanged, against a live mixloom server (real uvicorn,
SQLite, a real worker training a tiny base model): files, fine-tuning jobs with OpenAI's own
bodies, their events and checkpoints, cancel, the models routes, and chat completions and
completions of the model the job made."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from live_server import TRAIN_ROWS, serve_asgi
from tiny import save_tiny_base

from mixloom.config import Settings
from mixloom.scheduler.worker import Worker
from mixloom.storage import migrate, tenants
from mixloom.storage.bus import make_bus
from mixloom.storage.db import Database

BASE = "tiny-base"  # the base's folder name: its public id
SUPERVISED = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}


@dataclass
class Served:
    url: str
    db: Database
    folder: Path

    def client(self, tenant: str) -> openai.OpenAI:
        """The SDK as a new tenant would set it up: its key, our URL, nothing else."""
        with self.db.transaction() as session:
            t = tenants.create_tenant(session=session, name=tenant)
            _, key = tenants.create_api_key(session=session, tenant_id=t.id)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The API and a worker thread (what `mixloom serve` runs) on a tiny base model."""
    from mixloom.server.app import create_app

    tmp = tmp_path_factory.mktemp("openai-sdk")
    folder = save_tiny_base(tmp / BASE)
    settings = Settings(
        data_dir=tmp / "data",
        base_model=str(folder),
        device="cpu",
        kernel_backend="torch",
        worker_lease_seconds=5.0,
        worker_poll_seconds=0.2,
        worker_metrics_interval_seconds=0.0,
    )
    migrate.upgrade(settings.resolved_database_url)
    db = Database.connect(settings.resolved_database_url)
    bus = make_bus(None)
    worker = Worker(settings, db=db, bus=bus)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert worker.ready.wait(120), "the worker did not start"
        with serve_asgi(create_app(settings, db=db, bus=bus)) as url:
            yield Served(url=url, db=db, folder=folder)
    finally:
        stop.set()
        thread.join(timeout=60)
        db.dispose()


def _wait(client: openai.OpenAI, job_id: str, *statuses: str, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert job.status != "failed", job.error
        assert time.monotonic() < deadline, f"{job_id} still {job.status}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def tuned(served: Served) -> tuple[openai.OpenAI, Any]:
    """A tenant's SDK client and its job, trained to the end with OpenAI's own body."""
    client = served.client("sdk-tenant")
    f = client.files.create(file=("train.jsonl", TRAIN_ROWS), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=f.id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 10}},
        },
        suffix="sdk-test",
        metadata={"team": "search"},
        seed=7,
    )
    return client, _wait(client, job.id, "succeeded")


def test_files_jobs_events_and_checkpoints(
    served: Served, tuned: tuple[openai.OpenAI, Any]
) -> None:
    client, job = tuned
    f = client.files.retrieve(job.training_file)
    assert (f.purpose, f.filename, f.bytes) == ("fine-tune", "train.jsonl", len(TRAIN_ROWS))
    assert job.id in [x.id for x in client.fine_tuning.jobs.list(limit=10)]

    assert job.model == BASE and job.organization_id.startswith("tenant-")
    assert (job.suffix, job.metadata, job.seed) == ("sdk-test", {"team": "search"}, 7)
    assert job.method is not None and job.method.type == "supervised"
    assert job.method.supervised is not None
    hp = job.method.supervised.hyperparameters
    assert hp is not None and (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (
        1,
        10,
        1,
    )
    assert job.hyperparameters.n_epochs == 1
    # OpenAI's id shape, and no server path in it
    assert job.fine_tuned_model == f"ft:{BASE}:{job.organization_id}:sdk-test:{job.id}"
    assert str(served.folder) not in job.model_dump_json()
    assert job.trained_tokens and job.finished_at

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].object == "fine_tuning.job.event"
    assert any(e.message.startswith("Job succeeded") for e in events)
    assert not any(str(served.folder) in e.message for e in events)
    (ckpt,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpt.fine_tuning_job_id == job.id and ckpt.step_number == 2  # 20 rows / 10
    assert ckpt.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-2"


def test_cancel_and_older_bodies(served: Served) -> None:
    client = served.client("sdk-cancel")
    f = client.files.create(file=("train.jsonl", TRAIN_ROWS), purpose="fine-tune")
    # OpenAI's older body: top-level hyperparameters, no method
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=f.id, hyperparameters={"n_epochs": 50, "batch_size": 1}
    )
    assert job.method is not None and job.method.type == "supervised"
    assert job.hyperparameters.n_epochs == 50
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.id == job.id and cancelled.status in ("cancelled", "running", "queued")
    assert _wait(client, job.id, "cancelled").fine_tuned_model is None
    assert job.id in [x.id for x in client.fine_tuning.jobs.list(limit=10)]


def test_chat_and_completions(served: Served, tuned: tuple[openai.OpenAI, Any]) -> None:
    """chat.completions (whole and streamed) and completions of the fine-tuned model, in the
    SDK's own types (runs before the models test deletes the model)."""
    client, job = tuned
    model = job.fine_tuned_model
    messages = [{"role": "user", "content": "2+3"}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0
    )
    assert (chat.object, chat.model) == ("chat.completion", model)
    (choice,) = chat.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    usage = chat.usage
    assert usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage == usage

    completion = client.completions.create(
        model=model, prompt="2+3=", max_tokens=5, temperature=0, logprobs=2
    )
    assert completion.object == "text_completion"
    (c,) = completion.choices
    assert c.logprobs is not None and c.logprobs.tokens and c.logprobs.top_logprobs
    assert "".join(c.logprobs.tokens).startswith(c.text) or c.text == ""
    assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    streamed = client.completions.create(
        model=model, prompt="2+3=", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(x.choices[0].text for x in streamed if x.choices) == c.text
    assert client.chat.completions.create(model=BASE, messages=messages, max_tokens=2).choices

    other = served.client("sdk-chat-other")
    with pytest.raises(openai.NotFoundError) as hidden:
        other.chat.completions.create(model=model, messages=messages)
    assert hidden.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as absurd:
        client.chat.completions.create(model=model, messages=messages, max_tokens=10**9)
    assert absurd.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model=model, messages=[])
    assert empty.value.param == "messages"


def test_models_list_retrieve_and_delete(served: Served, tuned: tuple[openai.OpenAI, Any]) -> None:
    client, job = tuned
    name = job.fine_tuned_model
    assert [m.id for m in client.models.list()] == [BASE, name]
    model = client.models.retrieve(name)
    assert (model.id, model.object, model.owned_by) == (name, "model", job.organization_id)
    (ckpt,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert client.models.retrieve(ckpt.fine_tuned_model_checkpoint).id == (
        ckpt.fine_tuned_model_checkpoint
    )
    assert client.models.retrieve(BASE).owned_by == "mixloom"

    # another tenant: the model is missing, in the words a missing one gets
    other = served.client("sdk-other")
    assert [m.id for m in other.models.list()] == [BASE]
    with pytest.raises(openai.NotFoundError) as hidden:
        other.models.retrieve(name)
    with pytest.raises(openai.NotFoundError) as missing:
        other.models.retrieve(name.replace(job.id, "ftjob-000000000000000000000000"))
    assert hidden.value.code == missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        other.models.delete(name)

    # bad input: a 4xx naming the field
    f = client.files.create(file=("train.jsonl", TRAIN_ROWS), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as unknown:
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=f.id)
    assert unknown.value.param == "model" and BASE in unknown.value.message
    with pytest.raises(openai.BadRequestError) as suffix:
        client.fine_tuning.jobs.create(model=BASE, training_file=f.id, suffix="not ok")
    assert suffix.value.param == "suffix"
    with pytest.raises(openai.BadRequestError) as metadata:
        many = {f"k{i}": "v" for i in range(17)}
        client.fine_tuning.jobs.create(model=BASE, training_file=f.id, metadata=many)
    assert metadata.value.param == "metadata"
    with pytest.raises(openai.BadRequestError) as base:
        client.models.delete(BASE)
    assert base.value.code == "model_not_deletable"

    # delete: the checkpoint model, then the model; again is the same answer
    assert client.models.delete(ckpt.fine_tuned_model_checkpoint).deleted
    deleted = client.models.delete(name)
    assert (deleted.id, deleted.object, deleted.deleted) == (name, "model", True)
    assert client.models.delete(name).deleted
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(name)
    assert [m.id for m in client.models.list()] == [BASE]
    after = client.fine_tuning.jobs.retrieve(job.id)
    assert after.status == "succeeded" and after.fine_tuned_model == name  # the job stays
