"""A tenant cannot fill the disk or pass absurd hyperparameters (issue 14): the deployment's
bounds on every costly hyperparameter, no non-finite numbers, the storage quota at job
creation, and deleting a finished job's checkpoints and adapter."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import MODEL, Api, make_api

from mixloom.storage import jobs
from mixloom.storage.records import JobStatus

JOBS = "/v1/fine_tuning/jobs"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def limited_api(tmp_path: Path, sqlite_template: Path) -> Iterator[Api]:
    path = tmp_path / "mixloom.db"
    shutil.copy(sqlite_template, path)
    yield from make_api(
        tmp_path,
        f"sqlite:///{path}",
        None,
        max_job_steps=5,
        max_lora_r=16,
        max_experts=4,
        max_batch_size=8,
        max_epochs=3,
        keep_checkpoints=2,
    )


def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    return dict(r.json()["error"])


def _problems(err: dict[str, Any]) -> dict[str, str]:
    listed = err.get("problems") or [{"where": err["param"], "message": err["message"]}]
    return {p["where"]: p["message"] for p in listed}


def _jobs(api: Api, h: dict[str, str]) -> list[Any]:
    return list(api.client.get(JOBS, headers=h).json()["data"])


def test_every_bound_is_named_with_its_value_and_setting(limited_api: Api) -> None:
    api, h = limited_api, limited_api.tenant()
    fid = api.file_id(h)
    hp = {
        "r": 32,
        "num_experts": 8,
        "top_k": 2,
        "batch_size": 16,
        "n_epochs": 4,
        "max_steps": 6,
        "checkpoint_every": 7,
        "keep_checkpoints": 3,
        "max_seq_len": 8000,
        "expert_lora": {"r": 64},
    }
    method = {"type": "mixlora", "mixlora": {"hyperparameters": hp}}
    err = _error(api.create_job(h, fid, method=method), 400)
    problems = _problems(err)
    at = "method.mixlora.hyperparameters."
    for name, value, bound, setting in [
        ("r", 32, 16, "MAX_LORA_R"),
        ("expert_lora.r", 64, 16, "MAX_LORA_R"),
        ("num_experts", 8, 4, "MAX_EXPERTS"),
        ("batch_size", 16, 8, "MAX_BATCH_SIZE"),
        ("n_epochs", 4, 3, "MAX_EPOCHS"),
        ("max_steps", 6, 5, "MAX_JOB_STEPS"),
        ("checkpoint_every", 7, 5, "MAX_JOB_STEPS"),
        ("keep_checkpoints", 3, 2, "KEEP_CHECKPOINTS"),
        ("max_seq_len", 8000, 4096, "MAX_SEQ_LEN"),
    ]:
        message = problems.pop(at + name)
        assert f"{value} is more than" in message and f"at most {bound}" in message, message
        assert f"MIXLOOM_{setting}" in message
    assert problems == {}
    assert _jobs(api, h) == []

    # within every bound: created
    ok = {"r": 16, "num_experts": 4, "batch_size": 8, "n_epochs": 3, "keep_checkpoints": 2}
    r = api.create_job(h, fid, method={"type": "mixlora", "mixlora": {"hyperparameters": ok}})
    assert r.status_code == 200, r.text


def test_steps_over_epochs_are_bounded_by_max_job_steps(limited_api: Api) -> None:
    api, h = limited_api, limited_api.tenant()
    fid = api.file_id(h)  # 2 rows
    hp: dict[str, Any] = {"batch_size": 1, "n_epochs": 3}  # 6 steps
    err = _error(
        api.create_job(h, fid, method={"type": "lora", "lora": {"hyperparameters": hp}}), 400
    )
    assert err["param"] == "method.lora.hyperparameters.n_epochs"
    assert "6 optimizer steps" in err["message"] and "MIXLOOM_MAX_JOB_STEPS" in err["message"]
    assert _jobs(api, h) == []
    hp["max_steps"] = 5
    r = api.create_job(h, fid, method={"type": "lora", "lora": {"hyperparameters": hp}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("field", "literal"),
    [
        ("learning_rate", "Infinity"),
        ("learning_rate", "1e400"),
        ("lora_alpha", "NaN"),
        ("max_grad_norm", "-Infinity"),
        ("top_p", "NaN"),
        ("router_aux_loss_coef", "1e400"),
        ("expert_lora", '{"lora_alpha": Infinity}'),
    ],
)
def test_non_finite_numbers_are_refused_by_name(api: Api, field: str, literal: str) -> None:
    h = api.tenant()
    fid = api.file_id(h)
    body = (
        f'{{"model": "{MODEL}", "training_file": "{fid}", "method": {{"type": "mixlora", '
        f'"mixlora": {{"hyperparameters": {{"{field}": {literal}}}}}}}}}'
    )
    r = api.client.post(JOBS, headers={**h, "Content-Type": "application/json"}, content=body)
    err = _error(r, 400)
    where = f"method.mixlora.hyperparameters.{field}"
    assert err["param"].startswith(where), err
    assert "finite" in err["message"]
    assert _jobs(api, h) == []


def test_huge_integers_are_refused_with_the_bound(api: Api) -> None:
    h = api.tenant()
    fid = api.file_id(h)
    for field, bound in [
        ("max_steps", "at most 100000 (MIXLOOM_MAX_JOB_STEPS)"),
        ("checkpoint_every", "at most 100000 (MIXLOOM_MAX_JOB_STEPS)"),
        ("keep_checkpoints", "at most 3 (MIXLOOM_KEEP_CHECKPOINTS)"),
        ("r", "less than or equal to 1024"),  # beyond what mixloom takes at all
        ("n_epochs", "less than or equal to 1000"),
    ]:
        method = {"type": "lora", "lora": {"hyperparameters": {field: 10**30}}}
        err = _error(api.create_job(h, fid, method=method), 400)
        assert err["param"] == f"method.lora.hyperparameters.{field}", err
        assert bound in err["message"], err
    for patch, param in [
        ('"seed": 1000000000000000000000000000000', "seed"),
        ('"seed": 1e400', "seed"),
        ('"metadata": {"k": 1e400}', "metadata.k"),
        ('"metadata": {"k": NaN}', "metadata.k"),
    ]:
        body = f'{{"model": "{MODEL}", "training_file": "{fid}", "method": {{"type": "lora"}}, '
        r = api.client.post(
            JOBS, headers={**h, "Content-Type": "application/json"}, content=body + patch + "}"
        )
        assert _error(r, 400)["param"] == param, r.text
    assert _jobs(api, h) == []


def _finish(api: Api, jid: str, *, checkpoints: int = 2, ckpt_bytes: int = 1000) -> list[str]:
    """Play the worker: `checkpoints` checkpoints (each a zip and the folder beside it) and
    an adapter of 500 bytes, then succeeded. Returns the checkpoint ids."""
    api.claim(jid)
    ids = []
    with api.ctx.db.transaction() as s:
        for step in range(1, checkpoints + 1):
            zip_path = api.write_zip(f"{jid}/step-{step}.zip")
            folder = Path(zip_path).with_suffix("")
            folder.mkdir()
            (folder / "trainer_state.pt").write_bytes(b"\0" * 32)
            ckpt = jobs.add_checkpoint(
                session=s, job_id=jid, step=step, path=zip_path, bytes=ckpt_bytes
            )
            ids.append(ckpt.id)
        adapter = api.write_zip(f"{jid}/adapter.zip")
        jobs.set_adapter_path(session=s, job_id=jid, path=adapter, fine_tuned_model="ft", bytes=500)
        jobs.release_job(session=s, job_id=jid, worker_id="worker-1", status=JobStatus.SUCCEEDED)
    return ids


def _usage(api: Api, h: dict[str, str]) -> dict[str, Any]:
    r = api.client.get("/v1/usage", headers=h)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_job_creation_is_refused_once_storage_is_full(api: Api) -> None:
    h = api.tenant(max_total_bytes=2000)
    fid = api.file_id(h)
    jid = api.job_id(h, fid)
    _finish(api, jid)  # 2000 of checkpoints + 500 of adapter + the file: over 2000
    err = _error(api.create_job(h, fid), 429)
    assert err["code"] == "storage_quota_exceeded"
    assert "max_total_bytes is 2,000 bytes" in err["message"]
    assert "checkpoints 2,000" in err["message"] and "adapters 500" in err["message"]
    assert len(_jobs(api, h)) == 1

    r = api.client.delete(f"{JOBS}/{jid}/checkpoints", headers=h)
    assert r.status_code == 200, r.text
    assert api.create_job(h, fid).status_code == 200


def test_delete_checkpoints_and_adapter_of_a_finished_job(api: Api) -> None:
    h = api.tenant()
    fid = api.file_id(h)
    jid = api.job_id(h, fid)
    first, second = _finish(api, jid)
    c = api.client
    usage = _usage(api, h)
    assert (usage["checkpoint_bytes"], usage["adapter_bytes"]) == (2000, 500)
    assert usage["stored_bytes"] == usage["file_bytes"] + 2500
    assert usage["max_total_bytes"] == api.settings.max_tenant_bytes
    job = c.get(f"{JOBS}/{jid}", headers=h).json()
    with api.ctx.db.transaction() as s:
        paths = [
            jobs.get_checkpoint(session=s, job_id=jid, checkpoint_id=i).path
            for i in (first, second)
        ]
        adapter = jobs.get_job(session=s, job_id=jid).adapter_path
    assert adapter is not None

    # one checkpoint: its zip and folder go; again, 404
    r = c.delete(f"{JOBS}/{jid}/checkpoints/{first}", headers=h)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "id": first,
        "object": "fine_tuning.job.checkpoint",
        "deleted": True,
        "bytes": 1000,
    }
    assert not Path(paths[0]).exists() and not Path(paths[0]).with_suffix("").exists()
    assert Path(paths[1]).exists()
    assert _error(c.delete(f"{JOBS}/{jid}/checkpoints/{first}", headers=h), 404)["code"] == (
        "checkpoint_not_found"
    )
    assert _error(c.get(f"{JOBS}/{jid}/checkpoints/{first}/adapter", headers=h), 404)
    assert _usage(api, h)["checkpoint_bytes"] == 1000

    # all the others; again, none
    r = c.delete(f"{JOBS}/{jid}/checkpoints", headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == [
        {"id": second, "object": "fine_tuning.job.checkpoint", "deleted": True, "bytes": 1000}
    ]
    assert r.json()["bytes"] == 1000 and not Path(paths[1]).exists()
    r = c.delete(f"{JOBS}/{jid}/checkpoints", headers=h)
    assert r.status_code == 200 and r.json() == {"object": "list", "data": [], "bytes": 0}
    assert c.get(f"{JOBS}/{jid}/checkpoints", headers=h).json()["data"] == []

    # the adapter: the job stays, its download is 410; again, nothing freed
    assert c.get(f"{JOBS}/{jid}/adapter", headers=h).status_code == 200
    r = c.delete(f"{JOBS}/{jid}/adapter", headers=h)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "id": jid,
        "object": "fine_tuning.job.adapter",
        "deleted": True,
        "bytes": 500,
    }
    assert not Path(adapter).exists()
    err = _error(c.get(f"{JOBS}/{jid}/adapter", headers=h), 410)
    assert err["code"] == "adapter_deleted" and "was deleted" in err["message"]
    r = c.delete(f"{JOBS}/{jid}/adapter", headers=h)
    assert r.status_code == 200 and r.json()["bytes"] == 0
    after = c.get(f"{JOBS}/{jid}", headers=h).json()
    assert after["adapter_available"] is False and after["adapter_deleted_at"] is not None
    assert after["fine_tuned_model"] == job["fine_tuned_model"] == "ft"
    assert after["status"] == "succeeded"
    usage = _usage(api, h)
    assert (usage["checkpoint_bytes"], usage["adapter_bytes"]) == (0, 0)
    assert usage["stored_bytes"] == usage["file_bytes"]
    events = [e["message"] for e in c.get(f"{JOBS}/{jid}/events", headers=h).json()["data"]]
    assert any("Deleted the adapter" in e for e in events)
    assert any("Deleted 1 checkpoint(s)" in e for e in events)


def test_deleting_is_refused_until_the_job_finished(api: Api) -> None:
    h = api.tenant()
    jid = api.job_id(h)
    c = api.client
    routes = [
        f"{JOBS}/{jid}/checkpoints",
        f"{JOBS}/{jid}/checkpoints/ftckpt-x",
        f"{JOBS}/{jid}/adapter",
    ]
    for status in ("queued", "running", "paused"):
        if status == "running":
            api.claim(jid)
        if status == "paused":
            assert c.post(f"{JOBS}/{jid}/pause", headers=h).json()["requested_action"] == "pause"
            with api.ctx.db.transaction() as s:
                jobs.release_job(
                    session=s, job_id=jid, worker_id="worker-1", status=JobStatus.PAUSED
                )
        for url in routes:
            err = _error(c.delete(url, headers=h), 409)
            assert err["code"] == "job_not_finished" and f"is {status}" in err["message"], err

    # another tenant's job looks like a missing one
    other = api.tenant()
    for url in routes:
        assert _error(c.delete(url, headers=other), 404)["code"] == "job_not_found"
