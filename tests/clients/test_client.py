"""The Python client against a live server: every route, pagination, error mapping,
retries (429 with Retry-After, 5xx, connection errors) and idempotent creation."""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from live_server import TRAIN_ROWS, LiveServer, ScriptedWorker, free_port, live_api, serve_asgi

from mixloom.clients import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    GoneError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServerError,
)
from mixloom.clients.client import _parse_sse, _retry_after


def test_models(client: Client) -> None:
    models = client.list_models()
    assert [m.id for m in models] == ["smollm2-135m"]
    assert models[0].max_position_embeddings > 0


def test_openai_method_suffix_metadata_and_fine_tuned_models(
    server: LiveServer, client: Client, train_file: Path, finish: Callable[[str], str]
) -> None:
    f = client.upload_file(train_file)
    method = {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": "auto"},
            "adapter": {"type": "mixlora", "hyperparameters": {"num_experts": 4}},
        },
    }
    job = client.create_job(
        training_file=f.id, method=method, suffix="bot", metadata={"team": "search"}
    )
    assert (job.method_type, job.adapter_type, job.method_label) == (
        "supervised",
        "mixlora",
        "supervised/mixlora",
    )
    assert (job.hyperparameters["n_epochs"], job.hyperparameters["num_experts"]) == (2, 4)
    assert (job.suffix, job.metadata, job.organization_id) == ("bot", {"team": "search"}, ANY)
    name = finish(job.id)
    assert (
        client.get_job(job.id).fine_tuned_model
        == name
        == f"ft:smollm2-135m:{job.organization_id}:bot:{job.id}"
    )

    listed = client.list_models()
    assert [m.id for m in listed] == ["smollm2-135m", name] and not listed[0].fine_tuned
    model = client.get_model(name)
    assert model == listed[1] and model.fine_tuned
    assert (model.parent, model.adapter, model.owned_by) == (
        "smollm2-135m",
        "mixlora",
        job.organization_id,
    )
    (ckpt,) = client.iter_checkpoints(job.id)
    step = client.get_model(ckpt.fine_tuned_model_checkpoint)
    assert (step.parent, step.step_number) == (name, ckpt.step_number)

    with Client(server.url, server.new_key("tenant-other"), max_retries=0) as other:
        with pytest.raises(NotFoundError) as hidden:
            other.get_model(name)
        assert hidden.value.code == "model_not_found"
        assert [m.id for m in other.list_models()] == ["smollm2-135m"]

    assert client.delete_model(ckpt.fine_tuned_model_checkpoint).deleted
    gone = client.delete_model(name)
    assert (gone.id, gone.object, gone.deleted) == (name, "model", True)
    assert client.delete_model(name) == gone
    with pytest.raises(NotFoundError) as deleted:
        client.get_model(name)
    assert deleted.value.code == "model_deleted"
    assert [m.id for m in client.list_models()] == ["smollm2-135m"]
    assert client.get_job(job.id).adapter_deleted_at is not None
    with pytest.raises(BadRequestError) as base:
        client.delete_model("smollm2-135m")
    assert base.value.code == "model_not_deletable"


def test_file_routes(client: Client, train_file: Path, tmp_path: Path) -> None:
    f = client.upload_file(train_file)
    assert (f.filename, f.rows, f.bytes, f.purpose) == (
        "train.jsonl",
        20,
        len(TRAIN_ROWS),
        "fine-tune",
    )
    assert client.get_file(f.id) == f
    assert [x.id for x in client.list_files()] == [f.id]
    copy = client.download_file(f.id, tmp_path)
    assert copy.read_bytes() == TRAIN_ROWS
    assert client.delete_file(f.id) is True
    with pytest.raises(NotFoundError):
        client.get_file(f.id)


def test_job_lifecycle_routes(client: Client, train_file: Path) -> None:
    f = client.upload_file(train_file)
    job = client.create_job(
        training_file=f.id,
        validation_file=f.id,
        method="mixlora",
        hyperparameters={"r": 4, "num_experts": 4, "top_k": 2},
        seed=7,
        suffix="demo",
        metadata={"team": "search"},
    )
    assert job.status == "queued" and job.method_type == "mixlora"
    assert job.hyperparameters["num_experts"] == 4 and job.hyperparameters["r"] == 4
    assert (job.seed, job.suffix, job.metadata) == (7, "demo", {"team": "search"})
    assert client.get_job(job.id).id == job.id
    assert [j.id for j in client.list_jobs()] == [job.id]

    assert client.pause_job(job.id).status == "paused"
    assert client.resume_job(job.id).status == "queued"
    assert client.cancel_job(job.id).status == "cancelled"
    assert client.cancel_job(job.id).status == "cancelled"  # unchanged, not an error

    statuses = [e.data["status"] for e in client.iter_events(job.id) if e.type == "status"]
    assert statuses == ["cancelled", "queued", "paused", "queued"]  # newest first
    assert client.list_metrics(job.id).data == []
    assert client.list_checkpoints(job.id).data == []
    frames = list(client.stream(job.id))
    assert frames[-1].event == "end" and frames[-1].data == {"status": "cancelled"}
    assert [m.id for m in frames[:-1]] == list(range(1, len(frames)))
    assert client.wait(job.id, timeout=5).status == "cancelled"


def test_trained_job_metrics_checkpoints_and_downloads(
    server: LiveServer, client: Client, train_file: Path, tmp_path: Path
) -> None:
    f = client.upload_file(train_file)
    job = client.create_job(training_file=f.id, method="lora")
    with pytest.raises(ConflictError) as exc:
        client.download_adapter(job.id, tmp_path)
    assert exc.value.code == "adapter_not_ready" and "queued" in str(exc.value)

    ScriptedWorker(server, steps=6, tick=0.01).run_job(job.id)
    metrics = list(client.iter_metrics(job.id, page_size=4))  # two pages
    assert [m.step for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[0].train_loss is not None and metrics[-1].train_loss < metrics[0].train_loss
    (ckpt,) = client.iter_checkpoints(job.id)
    assert ckpt.step_number == 3

    final = client.download_adapter(job.id, tmp_path)
    assert final.name == f"{job.id}-adapter.zip"
    assert "adapter_config.json" in zipfile.ZipFile(final).namelist()
    step = client.download_adapter(job.id, tmp_path / "ckpt.zip", checkpoint_id=ckpt.id)
    assert step == tmp_path / "ckpt.zip" and zipfile.is_zipfile(step)
    assert client.get_job(job.id).adapter_available


def test_delete_checkpoints_and_adapter_then_usage(
    server: LiveServer, client: Client, train_file: Path, tmp_path: Path
) -> None:
    f = client.upload_file(train_file)
    job = client.create_job(training_file=f.id, method="lora")
    with pytest.raises(ConflictError) as unfinished:
        client.delete_adapter(job.id)
    assert unfinished.value.code == "job_not_finished" and "queued" in str(unfinished.value)
    ScriptedWorker(server, steps=4, tick=0.01).run_job(job.id)
    (ckpt,) = client.iter_checkpoints(job.id)

    (one,) = client.delete_checkpoints(job.id, checkpoint_id=ckpt.id)
    assert (one.id, one.object, one.deleted) == (ckpt.id, "fine_tuning.job.checkpoint", True)
    assert client.delete_checkpoints(job.id) == []
    gone = client.delete_adapter(job.id)
    assert (gone.id, gone.object) == (job.id, "fine_tuning.job.adapter")
    with pytest.raises(GoneError) as exc:
        client.download_adapter(job.id, tmp_path)
    assert exc.value.code == "adapter_deleted"
    after = client.get_job(job.id)
    assert not after.adapter_available and after.adapter_deleted_at is not None

    usage = client.usage()
    assert usage.file_bytes == f.bytes and usage.stored_bytes == f.bytes
    assert usage.waiting_jobs == usage.running_jobs == 0
    assert usage.max_total_bytes == server.settings.max_tenant_bytes


def test_stream_replays_from_a_sequence_number(
    server: LiveServer, client: Client, train_file: Path
) -> None:
    job = client.create_job(training_file=client.upload_file(train_file).id)
    ScriptedWorker(server, steps=3, tick=0.01).run_job(job.id)
    frames = list(client.stream(job.id))
    kinds = [m.event for m in frames]
    assert kinds.count("metrics") == 3 and kinds[-1] == "end"
    later = list(client.stream(job.id, after=frames[2].id or 0))
    assert [m.id for m in later[:-1]] == [m.id for m in frames[3:-1]]
    assert frames[3].metric is not None or frames[3].job_event is not None


# --- pagination -----------------------------------------------------------------------


def test_pagination_of_files_jobs_and_events(client: Client) -> None:
    ids = [client.upload_file(TRAIN_ROWS, filename=f"f{i}.jsonl").id for i in range(7)]
    page = client.list_files(limit=3)
    assert len(page) == 3 and page.has_more and page.next_after == page.data[-1].id
    second = client.list_files(limit=3, after=page.next_after)
    assert [f.id for f in second] == ids[::-1][3:6]
    assert [f.id for f in client.iter_files(page_size=3)] == ids[::-1]

    jobs = [client.create_job(training_file=ids[0]).id for _ in range(5)]
    assert [j.id for j in client.iter_jobs(page_size=2)] == jobs[::-1]
    for job_id in jobs[:2]:
        client.cancel_job(job_id)
    assert [j.id for j in client.iter_jobs(status="cancelled", page_size=1)] == jobs[:2][::-1]
    assert [j.id for j in client.iter_jobs(status="queued")] == jobs[2:][::-1]

    client.pause_job(jobs[2])
    client.resume_job(jobs[2])
    events = list(client.iter_events(jobs[2], page_size=1))
    assert [e.message for e in events][-1].startswith("Job created")
    # created, waiting for a worker (none runs here), paused, resumed
    assert len(events) == 4 and len({e.id for e in events}) == 4
    assert events[-2].message.startswith("Waiting for a worker that holds base")


# --- errors ---------------------------------------------------------------------------


def test_authentication_errors_carry_the_server_message(server: LiveServer) -> None:
    with (
        Client(server.url, "mxl-not-a-key", max_retries=0) as bad,
        pytest.raises(AuthenticationError) as exc,
    ):
        bad.list_files()
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    assert "invalid API key" in str(exc.value)
    with (
        Client(server.url, "", max_retries=0) as none,
        pytest.raises(AuthenticationError, match="missing API key"),
    ):
        none.list_jobs()


def test_other_tenants_objects_are_not_found(
    server: LiveServer, client: Client, train_file: Path
) -> None:
    f = client.upload_file(train_file)
    job = client.create_job(training_file=f.id)
    with Client(server.url, server.new_key("intruder"), max_retries=0) as other:
        for call in (
            lambda: other.get_job(job.id),
            lambda: other.cancel_job(job.id),
            lambda: other.get_file(f.id),
            lambda: other.list_events(job.id),
            lambda: other.create_job(training_file=f.id),
        ):
            with pytest.raises(NotFoundError):
                call()


def test_validation_errors_list_every_problem(client: Client, train_file: Path) -> None:
    f = client.upload_file(train_file)
    with pytest.raises(BadRequestError) as exc:
        client.create_job(
            training_file=f.id, method="lora", hyperparameters={"r": 0, "learning_rat": 1e-4}
        )
    where = {p.where for p in exc.value.problems}
    assert where == {"method.lora.hyperparameters.r", "method.lora.hyperparameters.learning_rat"}
    assert exc.value.status_code == 400 and exc.value.type == "invalid_request_error"

    with pytest.raises(BadRequestError) as bad_file:
        client.upload_file(b'{"prompt": "a"}\nnot json\n', filename="bad.jsonl")
    assert len(bad_file.value.problems) == 2
    assert all(p.where.startswith("bad.jsonl:") for p in bad_file.value.problems)


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A deployment with small limits: 2 KiB uploads, one waiting job per tenant."""
    with live_api(
        tmp_path_factory.mktemp("tight"), max_upload_bytes=2048, max_queued_jobs=1
    ) as srv:
        yield srv


def test_too_large_and_quota_errors(tight_server: LiveServer) -> None:
    slept: list[float] = []
    with Client(tight_server.url, tight_server.new_key("t"), sleep=slept.append) as client:
        with pytest.raises(PayloadTooLargeError) as big:
            client.upload_file(TRAIN_ROWS * 10, filename="big.jsonl")
        assert big.value.code == "file_too_large" and "2048" in str(big.value)
        f = client.upload_file(TRAIN_ROWS)
        client.create_job(training_file=f.id)
        with pytest.raises(RateLimitError) as quota:
            client.create_job(training_file=f.id)
    assert quota.value.code == "job_quota_exceeded"
    assert slept == []  # a full quota is not retried: waiting seconds does not free it


def test_connection_errors_are_retried_then_raised() -> None:
    slept: list[float] = []
    client = Client(f"http://127.0.0.1:{free_port()}", "k", max_retries=2, sleep=slept.append)
    with pytest.raises(APIConnectionError, match="cannot reach the mixloom server"):
        client.list_models()
    assert len(slept) == 2


# --- retries --------------------------------------------------------------------------


class Flaky:
    """ASGI wrapper: the next `fail` requests to `path` get `status` (429 with Retry-After,
    or a 5xx). With `after_app`, the request reaches the app first and only its response
    is replaced: the client cannot tell whether the server acted on it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.path = ""
        self.fail = 0
        self.status = 429
        self.after_app = False
        self.seen: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or self.fail <= 0:
            await self.app(scope, receive, send)
            return
        self.fail -= 1
        self.seen.append(dict(scope["headers"]).get(b"idempotency-key", b"").decode())
        if self.after_app:

            async def swallow(_: Any) -> None:
                pass

            await self.app(scope, receive, swallow)
        body = b'{"error": {"message": "slow down", "type": "rate_limit", "param": null, "code": "rate_limited"}}'
        headers = [(b"content-type", b"application/json")]
        if self.status == 429:
            headers.append((b"retry-after", b"0.2"))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextmanager
def flaky_server(server: LiveServer) -> Iterator[tuple[str, Flaky]]:
    flaky = Flaky(server.app)
    with serve_asgi(flaky) as url:
        yield url, flaky


def test_retry_on_429_honours_retry_after(server: LiveServer, api_key: str) -> None:
    with flaky_server(server) as (url, flaky):
        flaky.path, flaky.fail = "/v1/models", 2
        slept: list[float] = []

        def sleep(s: float) -> None:
            slept.append(s)
            time.sleep(s)

        with Client(url, api_key, max_retries=3, sleep=sleep) as client:
            started = time.monotonic()
            assert client.list_models()[0].id == "smollm2-135m"
            assert time.monotonic() - started >= 0.4
        assert slept == [0.2, 0.2] and len(flaky.seen) == 2

        flaky.fail = 5
        with (
            Client(url, api_key, max_retries=2, sleep=slept.append) as client,
            pytest.raises(RateLimitError) as exc,
        ):
            client.list_models()
        assert str(exc.value) == "slow down" and exc.value.headers["retry-after"] == "0.2"
        flaky.fail = 0


def test_retry_on_5xx_never_creates_twice(
    server: LiveServer, api_key: str, train_file: Path
) -> None:
    with flaky_server(server) as (url, flaky):
        slept: list[float] = []
        with Client(url, api_key, max_retries=3, backoff=0.01, sleep=slept.append) as client:
            f = client.upload_file(train_file)
            flaky.path, flaky.fail, flaky.status, flaky.after_app = (
                "/v1/fine_tuning/jobs",
                2,
                503,
                True,
            )
            job = client.create_job(training_file=f.id)
            assert len(slept) == 2
            assert len(set(flaky.seen)) == 1 and flaky.seen[0].startswith("mixloom-client-")
            assert [j.id for j in client.iter_jobs()] == [job.id]  # created once, replayed

            flaky.fail, flaky.after_app = 9, False
            with pytest.raises(ServerError):
                client.create_job(training_file=f.id)
            flaky.fail = 0


def test_retry_after_parsing() -> None:
    assert _retry_after("3") == 3.0
    assert _retry_after("-1") == 0.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < (_retry_after(later) or 0) <= 31


def test_sse_parser_skips_comments_and_joins_data_lines() -> None:
    lines = [
        "retry: 3000",
        "",
        ": keepalive",
        "",
        "id: 4",
        "event: metrics",
        'data: {"a":',
        "data: 1}",
        "",
    ]
    (frame,) = _parse_sse(iter(lines))
    assert (frame.event, frame.id, frame.data) == ("metrics", 4, {"a": 1})
