"""OpenAI's bodies and model routes through HTTP: the `supervised` method with mixloom's
`adapter` section, OpenAI's older top-level `hyperparameters`, `learning_rate_multiplier`
and "auto", `suffix` and `metadata`; model ids that name no server path; GET /v1/models with
the caller's fine-tuned models, GET and DELETE /v1/models/{id}. The worker is played
through the storage functions it calls."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import MODEL, Api, make_api

from mixloom.jobspec import BASE_LEARNING_RATE, MixLoraHyperparameters
from mixloom.model_ids import checkpoint_model_id, fine_tuned_model_id
from mixloom.scheduler.queue import hyperparameters
from mixloom.storage import jobs
from mixloom.storage.records import JobStatus
from mixloom.trainer.run import read_config

JOBS = "/v1/fine_tuning/jobs"


def _ok(r: Any) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err) and "Traceback" not in r.text
    return err


def _create(api: Api, h: dict[str, str], body: dict[str, Any]) -> Any:
    payload = {"model": MODEL, "training_file": api.file_id(h), **body}
    return api.client.post(JOBS, headers=h, json=payload)


def _api(tmp_path: Path, sqlite_template: Path, **settings: Any) -> Iterator[Api]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "mixloom.db"
    shutil.copy(sqlite_template, path)
    yield from make_api(tmp_path, f"sqlite:///{path}", None, **settings)


def test_openai_supervised_body_trains_the_default_adapter(sqlite_api: Api) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    hp = {"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 2}
    job = _ok(
        _create(api, h, {"method": {"type": "supervised", "supervised": {"hyperparameters": hp}}})
    )
    supervised = job["method"]["supervised"]
    assert job["method"]["type"] == "supervised"
    assert supervised["adapter"]["type"] == "lora"  # the deployment's default, written down
    assert supervised["adapter"]["hyperparameters"]["r"] == 8
    assert "num_experts" not in supervised["adapter"]["hyperparameters"]
    training = supervised["hyperparameters"]
    assert (training["n_epochs"], training["batch_size"]) == (3, 8)  # "auto": mixloom's default
    assert training["learning_rate"] == pytest.approx(2 * BASE_LEARNING_RATE)
    assert training["learning_rate_multiplier"] == 2
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 2}
    assert job["model"] == MODEL and job["organization_id"].startswith("tenant-")
    assert job["result_files"] == []
    # what the worker trains by
    with api.ctx.db.transaction() as s:
        record = jobs.get_job(session=s, job_id=job["id"])
    trained = hyperparameters(record)
    assert not isinstance(trained, MixLoraHyperparameters)
    assert (trained.n_epochs, trained.r) == (3, 8)
    assert trained.learning_rate == pytest.approx(4e-4)

    # no method at all (OpenAI's minimal body), and OpenAI's older top-level hyperparameters
    bare = _ok(_create(api, h, {}))
    assert bare["method"]["supervised"]["adapter"]["type"] == "lora"
    assert bare["hyperparameters"] == {
        "n_epochs": 1,
        "batch_size": 8,
        "learning_rate_multiplier": 1,
    }
    legacy = _ok(
        _create(api, h, {"hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": "auto"}})
    )
    assert legacy["method"]["type"] == "supervised"
    assert legacy["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate_multiplier": 1,
    }


def test_the_adapter_section_chooses_mixlora_and_its_hyperparameters(sqlite_api: Api) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    adapter = {"type": "mixlora", "hyperparameters": {"num_experts": 4, "top_k": 1, "r": 4}}
    body = {"hyperparameters": {"learning_rate": 1e-3, "max_seq_len": 64}, "adapter": adapter}
    job = _ok(_create(api, h, {"method": {"type": "supervised", "supervised": body}}))
    shown = job["method"]["supervised"]
    assert shown["adapter"]["hyperparameters"]["num_experts"] == 4
    assert shown["hyperparameters"]["learning_rate_multiplier"] == 5  # 1e-3 / 2e-4
    with api.ctx.db.transaction() as s:
        trained = hyperparameters(jobs.get_job(session=s, job_id=job["id"]))
    assert isinstance(trained, MixLoraHyperparameters)
    assert (trained.num_experts, trained.top_k, trained.r, trained.max_seq_len) == (4, 1, 4, 64)
    assert trained.learning_rate == pytest.approx(1e-3)

    # mixloom's own method types are what they were
    lora = {"type": "lora", "lora": {"hyperparameters": {"r": 4}}}
    job = _ok(_create(api, h, {"method": lora}))
    assert job["method"]["type"] == "lora" and job["method"]["lora"]["hyperparameters"]["r"] == 4
    assert job["hyperparameters"]["learning_rate_multiplier"] == 1


def test_the_operator_chooses_the_default_adapter(tmp_path: Path, sqlite_template: Path) -> None:
    for api in _api(tmp_path, sqlite_template, default_adapter="mixlora"):
        h = api.tenant()
        job = _ok(_create(api, h, {"method": {"type": "supervised"}}))
        assert job["method"]["supervised"]["adapter"]["type"] == "mixlora"
        assert job["method"]["supervised"]["adapter"]["hyperparameters"]["num_experts"] == 8
        legacy = _ok(_create(api, h, {"hyperparameters": {"n_epochs": 1}}))
        assert legacy["method"]["supervised"]["adapter"]["type"] == "mixlora"
        lora = {"type": "supervised", "supervised": {"adapter": {"type": "lora"}}}
        named = _ok(_create(api, h, {"method": lora}))["method"]["supervised"]["adapter"]
        assert named["type"] == "lora" and "num_experts" not in named["hyperparameters"]
        # mixloom's own method types say which adapter they train
        assert _ok(_create(api, h, {"method": {"type": "lora"}}))["method"]["type"] == "lora"


def test_suffix_and_metadata_are_kept_and_shown(sqlite_api: Api) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    metadata = {f"k{i}": "v" * 512 for i in range(16)} | {"x" * 64: ""}
    metadata.pop("k0")
    job = _ok(_create(api, h, {"suffix": "support-bot.v2", "metadata": metadata}))
    assert (job["suffix"], job["metadata"]) == ("support-bot.v2", metadata)
    again = _ok(api.client.get(f"{JOBS}/{job['id']}", headers=h))
    assert (again["suffix"], again["metadata"]) == ("support-bot.v2", metadata)
    listed = _ok(api.client.get(JOBS, headers=h))["data"][0]
    assert (listed["suffix"], listed["metadata"]) == ("support-bot.v2", metadata)
    assert _ok(_create(api, h, {"suffix": ""}))["suffix"] is None  # OpenAI's SDK may send ""


@pytest.mark.parametrize(
    ("patch", "param", "says"),
    [
        ({"suffix": "no spaces"}, "suffix", "model id"),
        ({"suffix": "a:b"}, "suffix", "model id"),
        ({"suffix": "x" * 65}, "suffix", "64"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
        ({"metadata": {"k" * 65: "v"}}, "metadata", "64"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k", "512"),
        ({"metadata": {"k": 5}}, "metadata.k", "string"),
        ({"model": "gpt-4o-mini"}, "model", MODEL),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "1"),
        ({"hyperparameters": {"r": 8}}, "hyperparameters", "adapter"),
        (
            {"method": {"type": "supervised"}, "hyperparameters": {"n_epochs": 2}},
            "hyperparameters",
            "not both",
        ),
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": "many"}},
                }
            },
            "method.supervised.hyperparameters.n_epochs",
            "integer",
        ),
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"learning_rate_multiplier": 0}},
                }
            },
            "method.supervised.hyperparameters.learning_rate_multiplier",
            "greater than 0",
        ),
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {
                        "hyperparameters": {"learning_rate": 1e-3, "learning_rate_multiplier": 2}
                    },
                }
            },
            "method.supervised.hyperparameters",
            "disagree",
        ),
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"adapter": {"type": "lora", "hyperparameters": {"top_k": 2}}},
                }
            },
            "method.supervised.adapter",
            "mixlora",
        ),
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"adapter": {"type": "mixlora", "hyperparameters": {"r": 999}}},
                }
            },
            "method.supervised.adapter.hyperparameters.r",
            "MIXLOOM_MAX_LORA_R",
        ),
        ({"method": {"type": "reinforcement"}}, "method.type", "supervised"),
    ],
)
def test_bad_openai_bodies_name_the_field(
    sqlite_api: Api, patch: dict[str, Any], param: str, says: str
) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    err = _error(_create(api, h, patch), 400)
    where = [p["where"] for p in err.get("problems") or [{"where": err["param"]}]]
    assert any(w.startswith(param) for w in where), (where, err)
    assert says in err["message"], err
    assert _ok(api.client.get(JOBS, headers=h))["data"] == []


def test_mixloom_train_configs_take_the_same_spelling(tmp_path: Path) -> None:
    config = {
        "base_model": "smollm2-135m",
        "jobs": [
            {
                "name": "openai",
                "training_file": "train.jsonl",
                "method": {
                    "type": "supervised",
                    "supervised": {
                        "hyperparameters": {"n_epochs": "auto", "learning_rate_multiplier": 0.5},
                        "adapter": {"type": "mixlora", "hyperparameters": {"num_experts": 2}},
                    },
                },
            },
            {"name": "plain", "training_file": "train.jsonl", "method": {"type": "supervised"}},
        ],
    }
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    _, (openai, plain), _ = read_config(path)
    assert isinstance(openai.method.hyperparameters, MixLoraHyperparameters)
    assert openai.method.hyperparameters.num_experts == 2
    assert openai.method.hyperparameters.learning_rate == pytest.approx(1e-4)
    assert plain.method.adapter_type == "lora"


def test_the_openapi_document_describes_the_adapter_extension(sqlite_api: Api) -> None:
    schemas = sqlite_api.client.get("/openapi.json").json()["components"]["schemas"]
    method = schemas["JobCreate"]["properties"]["method"]["description"]
    assert '"adapter"' in method and "supervised" in method
    adapter = schemas["AdapterSection"]
    assert adapter["description"].startswith("mixloom's extension")
    assert "num_experts" in adapter["properties"]["hyperparameters"]["description"]
    multiplier = schemas["SupervisedHyperparameters"]["properties"]["learning_rate_multiplier"]
    assert "learning_rate_multiplier x" in multiplier["description"]


# --- model ids and model routes ----------------------------------------------------------


def _succeed(api: Api, job_id: str, *, steps: tuple[int, ...] = (1, 2)) -> str:
    """Play the worker: checkpoints at `steps`, a final adapter, succeeded; returns the
    fine-tuned model id it records (as the worker names it)."""
    record = api.claim(job_id)
    model = fine_tuned_model_id(
        base=MODEL, org=record.tenant_id, suffix=record.suffix, job_id=job_id
    )
    with api.ctx.db.transaction() as s:
        for step in steps:
            jobs.add_checkpoint(
                session=s, job_id=job_id, step=step, path=api.write_zip(f"{job_id}-{step}.zip")
            )
        jobs.set_adapter_path(
            session=s,
            job_id=job_id,
            path=api.write_zip(f"{job_id}.zip"),
            fine_tuned_model=model,
            bytes=100,
        )
        jobs.release_job(session=s, job_id=job_id, worker_id="worker-1", status=JobStatus.SUCCEEDED)
    return model


def test_models_list_get_and_delete(api: Api) -> None:
    c, h = api.client, api.tenant()
    mix = {"type": "supervised", "supervised": {"adapter": {"type": "mixlora"}}}
    first = _ok(_create(api, h, {"suffix": "bot", "method": mix}))["id"]
    second = _ok(_create(api, h, {}))["id"]
    running = _ok(_create(api, h, {}))["id"]
    old, new = _succeed(api, first), _succeed(api, second)
    api.claim(running)
    assert old == f"ft:{MODEL}:{old.split(':')[2]}:bot:{first}"

    # the list: bases, then the caller's fine-tuned models, newest first
    listed = _ok(c.get("/v1/models", headers=h))["data"]
    assert [m["id"] for m in listed] == [MODEL, new, old]
    assert _ok(c.get(f"{JOBS}/{first}", headers=h))["fine_tuned_model"] == old
    ft = _ok(c.get(f"/v1/models/{old}", headers=h))
    assert ft == next(m for m in listed if m["id"] == old)
    assert (ft["object"], ft["owned_by"], ft["parent"], ft["adapter"]) == (
        "model",
        old.split(":")[2],
        MODEL,
        "mixlora",
    )
    assert (ft["fine_tuning_job_id"], ft["step_number"]) == (first, None)
    assert _ok(c.get(f"/v1/models/{MODEL}"))["id"] == MODEL  # a base: no key needed
    _error(c.get(f"/v1/models/{old}"), 401)  # a fine-tuned one: the owner's key

    # checkpoints are models too, named after the job's model
    ckpts = _ok(c.get(f"{JOBS}/{first}/checkpoints", headers=h))["data"]
    names = {x["step_number"]: x["fine_tuned_model_checkpoint"] for x in ckpts}
    assert names[2] == checkpoint_model_id(old, 2) == f"{old}:ckpt-step-2"
    ckpt = _ok(c.get(f"/v1/models/{names[2]}", headers=h))
    assert (ckpt["parent"], ckpt["step_number"]) == (old, 2)
    # a running job's checkpoint has the name its model will have
    with api.ctx.db.transaction() as s:
        jobs.add_checkpoint(session=s, job_id=running, step=1, path=api.write_zip("r-1.zip"))
    early = _ok(c.get(f"{JOBS}/{running}/checkpoints", headers=h))["data"][0]
    assert early["fine_tuned_model_checkpoint"].endswith(f"::{running}:ckpt-step-1")
    assert _ok(c.get(f"/v1/models/{early['fine_tuned_model_checkpoint']}", headers=h))
    err = _error(c.delete(f"/v1/models/{early['fine_tuned_model_checkpoint']}", headers=h), 409)
    assert err["code"] == "job_not_finished"
    _error(
        c.get(
            f"/v1/models/{early['fine_tuned_model_checkpoint'][: -len(':ckpt-step-1')]}", headers=h
        ),
        404,
    )

    # delete a checkpoint model, then the fine-tuned model: idempotent, the job stays
    gone = {"id": names[2], "object": "model", "deleted": True}
    assert _ok(c.delete(f"/v1/models/{names[2]}", headers=h)) == gone
    assert _ok(c.delete(f"/v1/models/{names[2]}", headers=h)) == gone
    assert [
        x["step_number"] for x in _ok(c.get(f"{JOBS}/{first}/checkpoints", headers=h))["data"]
    ] == [1]
    assert _error(c.get(f"/v1/models/{names[2]}", headers=h), 404)["code"] == "model_not_found"
    deleted = {"id": old, "object": "model", "deleted": True}
    assert _ok(c.delete(f"/v1/models/{old}", headers=h)) == deleted
    assert _ok(c.delete(f"/v1/models/{old}", headers=h)) == deleted
    job = _ok(c.get(f"{JOBS}/{first}", headers=h))
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == old
    assert job["adapter_deleted_at"] is not None and job["adapter_available"] is False
    assert _error(c.get(f"{JOBS}/{first}/adapter", headers=h), 410)["code"] == "adapter_deleted"
    assert _error(c.get(f"/v1/models/{old}", headers=h), 404)["code"] == "model_deleted"
    assert [m["id"] for m in _ok(c.get("/v1/models", headers=h))["data"]] == [MODEL, new]
    assert _ok(c.get(f"/v1/models/{names[1]}", headers=h))["id"] == names[1]  # checkpoints stay
    assert _ok(c.get("/v1/usage", headers=h))["adapter_bytes"] == 100  # only `new`'s is left

    # a base model is not deleted
    err = _error(c.delete(f"/v1/models/{MODEL}", headers=h), 400)
    assert (err["param"], err["code"]) == ("model", "model_not_deletable")
    assert "base model" in err["message"]
    err = _error(c.delete("/v1/models/gpt-17", headers=h), 404)
    assert (err["param"], err["code"]) == ("model", "model_not_found")


def test_a_name_given_out_before_migration_0003_still_finds_its_model(sqlite_api: Api) -> None:
    api, h = sqlite_api, sqlite_api.tenant()
    jid = _ok(_create(api, h, {"suffix": "demo"}))["id"]
    model = _succeed(api, jid)
    for legacy in (f"ft:{MODEL}:demo:{jid}", f"ft:{MODEL}:demo:{jid}:ckpt-step-1"):
        found = _ok(api.client.get(f"/v1/models/{legacy}", headers=h))
        assert found["id"].startswith(model), (legacy, found)


def job_body(model: str, file_id: str) -> dict[str, Any]:
    return {"model": model, "training_file": file_id}


def test_a_local_base_is_named_by_its_folder_or_alias(
    tmp_path: Path, sqlite_template: Path
) -> None:
    folder = tmp_path / "models" / "Tiny Llama:v2"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    for alias, public in ((None, "Tiny-Llama-v2"), ("house-model", "house-model")):
        for api in _api(
            tmp_path / (alias or "plain"),
            sqlite_template,
            base_model=str(folder),
            base_model_alias=alias,
        ):
            c, h = api.client, api.tenant()
            assert [m["id"] for m in _ok(c.get("/v1/models"))["data"]] == [public]
            fid = api.file_id(h)
            job = _ok(c.post(JOBS, headers=h, json={"model": public, "training_file": fid}))
            assert job["model"] == public
            # max_seq_len left unset fits the base's context; one given must fit it
            assert job["method"]["supervised"]["hyperparameters"]["max_seq_len"] == 256
            long = {"type": "lora", "lora": {"hyperparameters": {"max_seq_len": 512}}}
            err = _error(
                c.post(JOBS, headers=h, json={**job_body(public, fid), "method": long}), 400
            )
            assert (
                err["param"] == "method.lora.hyperparameters.max_seq_len"
                and "256" in err["message"]
            )
            # MIXLOOM_BASE_MODEL as the operator wrote it is accepted too, and shown as the id
            by_path = _ok(
                c.post(JOBS, headers=h, json={"model": str(folder), "training_file": fid})
            )
            assert by_path["model"] == public
            with api.ctx.db.transaction() as s:
                record = jobs.get_job(session=s, job_id=job["id"])
            assert record.model == str(folder)  # what a worker holding this base claims by
            shown = json.dumps(
                [job, _ok(c.get(f"{JOBS}/{job['id']}/events", headers=h)), _ok(c.get("/v1/models"))]
            )
            assert str(tmp_path) not in shown and "models/" not in shown
            event = _ok(c.get(f"{JOBS}/{job['id']}/events", headers=h))["data"][-1]
            assert event["message"] == f"Job created; queued for {public}"
