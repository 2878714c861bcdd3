"""The SSE stream against a live uvicorn server: live delivery from the bus, gaps filled
from the database, resume with Last-Event-ID after a disconnect, end on a finished job."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from api_support import Api

from mixloom.storage import jobs
from mixloom.storage.records import JobStatus

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def live(api: Api) -> Iterator[tuple[Api, str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield api, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _frames(response: httpx.Response) -> Iterator[dict[str, Any]]:
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if "event" in fields:
                yield {**fields, "data": json.loads(fields["data"])}
            fields = {}
        elif not line.startswith(":") and ": " in line:
            key, value = line.split(": ", 1)
            fields[key] = value


def _metrics(api: Api, job_id: str, steps: range, publish: bool = True) -> list[int]:
    seqs = []
    for step in steps:
        with api.ctx.db.transaction() as s:
            rec = jobs.add_metrics(
                session=s, job_id=job_id, step=step, values={"train_loss": 1.0 / step}
            )
        if publish:
            api.ctx.bus.publish(job_id, rec.to_message())
        seqs.append(rec.seq)
    return seqs


def test_live_stream_resume_and_end(live: tuple[Api, str]) -> None:
    api, base = live
    # No idle database polls during the test: what arrives, arrives through the bus or
    # through a gap/status-triggered database read.
    api.settings.sse_poll_seconds = 30
    h = api.tenant()
    jid = api.job_id(h)
    api.claim(jid)
    url = f"{base}/v1/fine_tuning/jobs/{jid}/stream"
    with httpx.Client(timeout=10) as client:
        with client.stream("GET", url, headers=h) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            frames = _frames(r)
            # created, waiting for a worker (the registry has none here), started
            assert [int(next(frames)["id"]) for _ in range(3)] == [1, 2, 3]
            # published while we listen: arrives live
            threading.Timer(0.2, _metrics, args=(api, jid, range(1, 4))).start()
            live_frames = [next(frames) for _ in range(3)]
            assert [f["data"]["step"] for f in live_frames] == [1, 2, 3]
            last_seen = int(live_frames[-1]["id"])
        # disconnected; meanwhile two steps go unpublished (a lost bus message) and one
        # is published out of order
        missed = _metrics(api, jid, range(4, 6), publish=False)
        with client.stream("GET", url, headers={**h, "Last-Event-ID": str(last_seen)}) as r:
            frames = _frames(r)
            replay = [int(next(frames)["id"]) for _ in missed]
            assert replay == missed
            with api.ctx.db.transaction() as s:
                a = jobs.add_metrics(session=s, job_id=jid, step=6, values={"train_loss": 0.1})
                b = jobs.add_metrics(session=s, job_id=jid, step=7, values={"train_loss": 0.1})
            api.ctx.bus.publish(jid, b.to_message())  # a gap: the stream fetches a from the DB
            assert [int(next(frames)["id"]) for _ in range(2)] == [a.seq, b.seq]
            with api.ctx.db.transaction() as s:
                jobs.release_job(
                    session=s, job_id=jid, worker_id="worker-1", status=JobStatus.SUCCEEDED
                )
            api.publish_since(jid, b.seq)
            rest = list(frames)
        assert rest[-1]["event"] == "end" and rest[-1]["data"]["status"] == "succeeded"
        assert (
            rest[0]["data"]["type"] == "status" and rest[0]["data"]["data"]["status"] == "succeeded"
        )


def test_stream_of_another_tenant_is_404_before_streaming(live: tuple[Api, str]) -> None:
    api, base = live
    jid = api.job_id(api.tenant())
    r = httpx.get(f"{base}/v1/fine_tuning/jobs/{jid}/stream", headers=api.tenant(), timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
