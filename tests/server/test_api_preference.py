"""Preference files and the jobs that take them: a dpo job is refused (400, naming the
file's parameter) unless its files hold preference rows, any other job is refused a
preference file, a refusal stores nothing, and the DPO demo file uploads as it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from api_support import LORA, MODEL, Api
from sqlalchemy import func, select

from mixloom.storage import models as m

pytestmark = pytest.mark.timeout(120)
JOBS = "/v1/fine_tuning/jobs"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
PAIRS = b"".join(
    json.dumps(
        {
            "input": {"messages": [{"role": "user", "content": f"{a}+{a}="}]},
            "preferred_output": [{"role": "assistant", "content": str(2 * a)}],
            "non_preferred_output": [{"role": "assistant", "content": str(2 * a + 1)}],
        }
    ).encode()
    + b"\n"
    for a in range(4)
)
DPO = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1}}}
SUPERVISED = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}
MIXLORA = {"type": "mixlora", "mixlora": {"hyperparameters": {"num_experts": 4}}}
CHOICES = b'{"query": "2+2=", "choices": ["4", "5"], "gold": 0}\n'
WANTS_PAIRS = 'the dpo method needs preference rows ({"input", "preferred_output", '


def _stored(api: Api) -> tuple[int, int]:
    """(jobs, job events) in the database."""
    with api.ctx.db.transaction() as s:
        return (
            s.scalar(select(func.count()).select_from(m.Job)) or 0,
            s.scalar(select(func.count()).select_from(m.JobEvent)) or 0,
        )


def _error(r: Any) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    assert "Traceback" not in r.text
    return dict(r.json()["error"])


def _upload(api: Api, headers: dict[str, str], data: bytes, purpose: str = "fine-tune") -> str:
    r = api.upload(headers, data, purpose=purpose)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_job_files_must_match_the_method(api: Api) -> None:
    h = api.tenant()
    pairs, rows = _upload(api, h, PAIRS), api.file_id(h)  # preference; prompt/completion
    choices = _upload(api, h, CHOICES, purpose="evals")
    before = _stored(api)

    err = _error(api.create_job(h, rows, method=DPO))
    assert (err["param"], err["code"]) == ("training_file", "invalid_value")
    assert WANTS_PAIRS in err["message"] and f"{rows} has prompt_completion rows" in err["message"]

    err = _error(api.create_job(h, pairs, validation_file=rows, method=DPO))
    assert err["param"] == "validation_file" and WANTS_PAIRS in err["message"]

    err = _error(api.create_job(h, choices, method=DPO))
    assert (
        err["param"] == "training_file" and "no training rows (purpose 'evals')" in err["message"]
    )

    err = _error(api.create_job(h, rows, validation_file=rows, method=DPO))  # both, at once
    assert err["param"] is None
    assert [p["where"] for p in err["problems"]] == ["training_file", "validation_file"]

    bare = {"model": MODEL, "training_file": pairs}  # OpenAI's body without a method
    for r in [
        *(api.create_job(h, pairs, method=method) for method in (SUPERVISED, LORA, MIXLORA)),
        api.client.post(JOBS, headers=h, json=bare),
    ]:
        err = _error(r)
        assert err["param"] == "training_file"
        assert f'{pairs} has preference rows, which are for method.type "dpo"' in err["message"]
    err = _error(api.create_job(h, rows, validation_file=pairs))
    assert err["param"] == "validation_file"
    assert _stored(api) == before

    r = api.create_job(h, pairs, validation_file=pairs, method=DPO)
    assert r.status_code == 200, r.text
    assert r.json()["method"]["type"] == "dpo"
    r = api.create_job(h, rows, validation_file=rows)
    assert r.status_code == 200, r.text


def test_a_file_gone_from_disk_is_410_naming_it(sqlite_api: Api) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    fid = api.file_id(h)
    with api.ctx.db.transaction() as s:
        Path(s.get_one(m.File, fid).path).unlink()
    before = _stored(api)
    r = api.create_job(h, fid)
    assert r.status_code == 410, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (
        "training_file",
        "file_missing",
    )
    assert _stored(api) == before


def test_the_dpo_demo_file_uploads(api: Api) -> None:
    h = api.tenant()
    data = (EXAMPLES / "dpo_demo.jsonl").read_bytes()
    r = api.upload(h, data, filename="dpo_demo.jsonl")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["purpose"], body["rows"], body["bytes"]) == ("fine-tune", 265, len(data))
    r = api.create_job(h, body["id"], method=DPO)
    assert r.status_code == 200, r.text
