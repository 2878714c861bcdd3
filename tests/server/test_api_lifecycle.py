"""The whole job lifecycle through HTTP on both backends, the worker played through the
storage functions it will call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from api_support import GOOD_JSONL, MODEL, Api, make_api

from mixloom.storage import jobs
from mixloom.storage.records import JobStatus

JOBS = "/v1/fine_tuning/jobs"


def _sse(text: str) -> list[dict[str, Any]]:
    frames = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":") or ": " not in line:
                continue
            key, value = line.split(": ", 1)
            fields[key] = value
        if "event" in fields:
            fields["data"] = json.loads(fields["data"])
            frames.append(fields)
    return frames


def test_models_lists_the_served_base_model(api: Api) -> None:
    r = api.client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [MODEL]
    assert r.json()["data"][0]["max_position_embeddings"] == 8192


def test_whole_lifecycle(api: Api) -> None:
    c, h = api.client, api.tenant()

    # files
    r = api.upload(h)
    assert r.status_code == 200, r.text
    f = r.json()
    assert (f["object"], f["rows"], f["bytes"], f["status"]) == (
        "file",
        2,
        len(GOOD_JSONL),
        "processed",
    )
    assert c.get(f"/v1/files/{f['id']}", headers=h).json() == f
    assert c.get(f"/v1/files/{f['id']}/content", headers=h).content == GOOD_JSONL
    assert [x["id"] for x in c.get("/v1/files", headers=h).json()["data"]] == [f["id"]]

    # create, get, list
    method = {"type": "mixlora", "mixlora": {"hyperparameters": {"num_experts": 4, "top_k": 2}}}
    r = api.create_job(h, f["id"], method=method, seed=7, suffix="demo", metadata={"team": "nlp"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "queued" and job["queue_position"] >= 1
    hp = job["method"]["mixlora"]["hyperparameters"]
    assert (hp["num_experts"], hp["top_k"], hp["r"]) == (4, 2, 8)  # defaults filled in
    assert (job["seed"], job["suffix"], job["metadata"]) == (7, "demo", {"team": "nlp"})
    jid = job["id"]
    assert c.get(f"{JOBS}/{jid}", headers=h).json()["id"] == jid
    assert jid in [j["id"] for j in c.get(JOBS, headers=h).json()["data"]]
    r = c.get(f"{JOBS}/{jid}/adapter", headers=h)
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_not_ready"
    assert c.delete(f"/v1/files/{f['id']}", headers=h).status_code == 409  # in use

    # the worker starts it; the user pauses; the worker honours it; the user resumes
    api.claim(jid)
    assert c.get(f"{JOBS}/{jid}", headers=h).json()["status"] == "running"
    r = c.post(f"{JOBS}/{jid}/pause", headers=h)
    assert (r.json()["status"], r.json()["requested_action"]) == ("running", "pause")
    with api.ctx.db.transaction() as s:
        beat = jobs.renew_lease(session=s, job_id=jid, worker_id="worker-1", lease_seconds=60)
        assert beat.requested_action == "pause"
        jobs.release_job(session=s, job_id=jid, worker_id="worker-1", status=JobStatus.PAUSED)
    assert c.get(f"{JOBS}/{jid}", headers=h).json()["status"] == "paused"
    r = c.post(f"{JOBS}/{jid}/resume", headers=h)
    assert r.json()["status"] == "queued" and r.json()["queue_position"] >= 1

    # the worker trains: metrics, events, a checkpoint, the adapter
    api.claim(jid, worker="worker-2")
    ckpt_path = api.write_zip("ckpt.zip")
    adapter_path = api.write_zip("final.zip")
    with api.ctx.db.transaction() as s:
        for step in range(1, 4):
            jobs.add_metrics(session=s, job_id=jid, step=step, values={"train_loss": 3.0 / step})
        jobs.add_checkpoint(
            session=s, job_id=jid, step=2, path=ckpt_path, metrics={"train_loss": 1.5}
        )
        jobs.set_adapter_path(
            session=s, job_id=jid, path=adapter_path, fine_tuned_model=f"{MODEL}:demo:{jid}"
        )
        jobs.release_job(session=s, job_id=jid, worker_id="worker-2", status=JobStatus.SUCCEEDED)

    done = c.get(f"{JOBS}/{jid}", headers=h).json()
    assert done["status"] == "succeeded" and done["finished_at"] and done["adapter_available"]
    assert done["queue_position"] is None
    metrics = c.get(f"{JOBS}/{jid}/metrics", headers=h).json()
    assert [m["step"] for m in metrics["data"]] == [1, 2, 3]
    assert [
        m["step"] for m in c.get(f"{JOBS}/{jid}/metrics?after=1&limit=1", headers=h).json()["data"]
    ] == [2]
    ckpts = c.get(f"{JOBS}/{jid}/checkpoints", headers=h).json()["data"]
    assert [(k["step_number"], k["fine_tuning_job_id"]) for k in ckpts] == [(2, jid)]
    r = c.get(f"{JOBS}/{jid}/checkpoints/{ckpts[0]['id']}/adapter", headers=h)
    assert r.status_code == 200 and r.content == Path(ckpt_path).read_bytes()
    r = c.get(f"{JOBS}/{jid}/adapter", headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.content == Path(adapter_path).read_bytes()

    # events, newest first, paginated
    events = c.get(f"{JOBS}/{jid}/events?limit=100", headers=h).json()["data"]
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses[::-1] == ["queued", "running", "paused", "queued", "running", "succeeded"]
    first = c.get(f"{JOBS}/{jid}/events?limit=2", headers=h).json()
    assert first["has_more"] and [e["id"] for e in first["data"]] == [e["id"] for e in events[:2]]
    nxt = c.get(f"{JOBS}/{jid}/events?limit=2&after={first['data'][-1]['id']}", headers=h).json()
    assert [e["id"] for e in nxt["data"]] == [e["id"] for e in events[2:4]]

    # the SSE stream replays everything in order and ends; Last-Event-ID resumes
    frames = _sse(c.get(f"{JOBS}/{jid}/stream", headers=h).text)
    ids = [int(f["id"]) for f in frames if "id" in f]
    assert ids == list(range(1, len(ids) + 1))
    assert frames[-1]["event"] == "end" and frames[-1]["data"] == {"status": "succeeded"}
    assert sum(f["event"] == "metrics" for f in frames) == 3
    rest = _sse(c.get(f"{JOBS}/{jid}/stream", headers={**h, "Last-Event-ID": "5"}).text)
    assert [int(f["id"]) for f in rest if "id" in f] == ids[5:]
    assert c.get(f"{JOBS}/{jid}/stream?after=5", headers=h).text.count("id: ") == len(ids) - 5

    # finished: cancel/pause/resume refused; the file can now be deleted
    for action in ("cancel", "pause", "resume"):
        r = c.post(f"{JOBS}/{jid}/{action}", headers=h)
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"
    assert c.delete(f"/v1/files/{f['id']}", headers=h).json() == {
        "id": f["id"],
        "object": "file",
        "deleted": True,
    }
    assert c.get(f"/v1/files/{f['id']}", headers=h).status_code == 404
    assert c.get(f"{JOBS}/{jid}", headers=h).json()["training_file"] == f["id"]


def test_cancel_queued_at_once_and_running_through_the_worker(api: Api) -> None:
    c, h = api.client, api.tenant()
    fid = api.file_id(h)
    queued, running = api.job_id(h, fid), api.job_id(h, fid)
    r = c.post(f"{JOBS}/{queued}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert c.post(f"{JOBS}/{queued}/cancel", headers=h).json()["status"] == "cancelled"

    api.claim(running)
    r = c.post(f"{JOBS}/{running}/cancel", headers=h)
    assert (r.json()["status"], r.json()["requested_action"]) == ("running", "cancel")
    assert c.post(f"{JOBS}/{running}/pause", headers=h).status_code == 409
    with api.ctx.db.transaction() as s:
        jobs.release_job(
            session=s, job_id=running, worker_id="worker-1", status=JobStatus.CANCELLED
        )
    final = c.get(f"{JOBS}/{running}", headers=h).json()
    assert (final["status"], final["requested_action"]) == ("cancelled", None)
    r = c.get(f"{JOBS}/{running}/adapter", headers=h)
    assert r.status_code == 409 and "cancelled" in r.json()["error"]["message"]


def test_failed_job_reports_its_error(api: Api) -> None:
    c, h = api.client, api.tenant()
    jid = api.job_id(h)
    api.claim(jid)
    error = {"message": "loss became NaN at step 3", "code": "nan_loss", "param": None}
    with api.ctx.db.transaction() as s:
        jobs.release_job(
            session=s, job_id=jid, worker_id="worker-1", status=JobStatus.FAILED, error=error
        )
    job = c.get(f"{JOBS}/{jid}", headers=h).json()
    assert job["status"] == "failed" and job["error"] == error


def test_missing_adapter_file_is_gone_not_500(api: Api) -> None:
    c, h = api.client, api.tenant()
    jid = api.job_id(h)
    api.claim(jid)
    with api.ctx.db.transaction() as s:
        jobs.set_adapter_path(session=s, job_id=jid, path=str(api.settings.data_dir / "nope.zip"))
        jobs.release_job(session=s, job_id=jid, worker_id="worker-1", status=JobStatus.SUCCEEDED)
    r = c.get(f"{JOBS}/{jid}/adapter", headers=h)
    assert r.status_code == 410 and r.json()["error"]["code"] == "archive_missing"


def test_a_bus_outage_fails_no_request(tmp_path: Path, sqlite_template: Path) -> None:
    """The bus is for latency only: with Redis unreachable, writes still succeed and
    streams still replay from the database."""
    db_path = tmp_path / "mixloom.db"
    shutil.copy(sqlite_template, db_path)
    dead_redis = "redis://127.0.0.1:1/0"
    for api in make_api(tmp_path, f"sqlite:///{db_path}", dead_redis):
        h = api.tenant()
        jid = api.job_id(h)
        assert api.client.post(f"{JOBS}/{jid}/cancel", headers=h).json()["status"] == "cancelled"
        frames = _sse(api.client.get(f"{JOBS}/{jid}/stream", headers=h).text)
        # created, waiting for a worker (none runs here), cancelled
        assert [f["event"] for f in frames] == ["event", "event", "event", "end"]
