"""The API with its bytes in S3 (a real `moto_server` on loopback): uploads go to the store
before their row, downloads stream from it or redirect to a presigned URL, deletes remove
the objects; an adapter folder in the store downloads as a zip built from its objects as it
streams; a store that cannot be reached answers 503 with Retry-After and records nothing."""

from __future__ import annotations

import io
import json
import shutil
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_support import GOOD_JSONL, Api, make_api
from s3 import Moto, free_port, moto_server
from safetensors.torch import load_file, save_file

from mixloom.storage import files, jobs, objects
from mixloom.storage.objects import S3Store
from mixloom.storage.records import JobStatus

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


def _api(tmp_path: Path, sqlite_template: Path, **settings: Any) -> Iterator[Api]:
    path = tmp_path / "mixloom.db"
    shutil.copy(sqlite_template, path)
    yield from make_api(tmp_path, f"sqlite:///{path}", None, **settings)


@pytest.fixture
def s3_api(tmp_path: Path, sqlite_template: Path, moto: Moto) -> Iterator[Api]:
    yield from _api(tmp_path, sqlite_template, **moto.settings("api"))


def _store(api: Api) -> S3Store:
    store = objects.open_store(api.settings)
    assert isinstance(store, S3Store)
    return store


def _local_files(api: Api) -> list[str]:
    return sorted(p.name for p in api.settings.data_dir.rglob("*") if p.is_file())


def test_upload_download_delete_through_s3(s3_api: Api) -> None:
    api, c = s3_api, s3_api.client
    h = api.tenant()
    r = api.upload(h)
    assert r.status_code == 200, r.text
    file_id = r.json()["id"]
    with api.ctx.db.transaction() as s:
        record = files.get_file(session=s, file_id=file_id)
    store = _store(api)
    key = files.file_key(record.tenant_id, file_id)
    assert record.path == store.location(key) == f"s3://api/mixloom/{key}"
    assert b"".join(store.iter_bytes(key)) == GOOD_JSONL
    assert not any(n.endswith(".jsonl") for n in _local_files(api))  # nothing kept on the API

    r = c.get(f"/v1/files/{file_id}/content", headers=h)
    assert r.status_code == 200 and r.content == GOOD_JSONL
    assert "train.jsonl" in r.headers["content-disposition"]
    # a job's file check reads the first row from the store
    assert api.create_job(h, file_id).status_code == 200

    # refused uploads leave no object
    assert api.upload(h, b'{"nope": 1}\n').status_code == 400
    assert store.list(f"files/{record.tenant_id}/") == [key]

    other = api.upload(h, filename="two.jsonl").json()["id"]
    assert c.delete(f"/v1/files/{other}", headers=h).status_code == 200
    assert store.list(f"files/{record.tenant_id}/") == [key]
    assert c.get(f"/v1/files/{other}/content", headers=h).status_code == 404


def test_an_idempotent_replay_stores_nothing_twice(s3_api: Api) -> None:
    api = s3_api
    h = {**api.tenant(), "Idempotency-Key": "upload-once"}
    first = api.upload(h)
    again = api.upload(h)
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    tenant = first.json()["id"]
    store = _store(api)
    with api.ctx.db.transaction() as s:
        t = files.get_file(session=s, file_id=tenant).tenant_id
    assert store.list(f"files/{t}/") == [files.file_key(t, tenant)]


def test_redirected_downloads_are_presigned_urls_of_the_store(
    tmp_path: Path, sqlite_template: Path, moto: Moto
) -> None:
    for api in _api(
        tmp_path, sqlite_template, storage_downloads="redirect", **moto.settings("redirect")
    ):
        h = api.tenant()
        file_id = api.upload(h).json()["id"]
        r = api.client.get(f"/v1/files/{file_id}/content", headers=h, follow_redirects=False)
        assert r.status_code == 307
        location = r.headers["location"]
        assert location.startswith(moto.url + "/redirect/mixloom/files/")
        with urllib.request.urlopen(location, timeout=10) as got:  # no credentials
            assert got.read() == GOOD_JSONL

        job_id = _succeeded_in_store(api, h, "MIXLORA")
        r = api.client.get(f"{JOBS}/{job_id}/adapter", headers=h, follow_redirects=False)
        assert r.status_code == 307
        with urllib.request.urlopen(r.headers["location"], timeout=10) as got:
            names = zipfile.ZipFile(io.BytesIO(got.read())).namelist()
        assert sorted(names) == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "mixloom_adapter.json",
        ]
        # the zip kept for redirects goes with its folder
        store = _store(api)
        folder = store.key_of(_adapter_location(api, job_id))
        assert folder is not None and store.size(f"{folder}.safetensors.zip") is not None
        assert api.client.delete(f"{JOBS}/{job_id}/checkpoints", headers=h).status_code == 200
        assert api.client.delete(f"{JOBS}/{job_id}/adapter", headers=h).status_code == 200
        assert store.list(folder) == []


def _adapter_location(api: Api, job_id: str) -> str:
    with api.ctx.db.transaction() as s:
        path = jobs.get_job(session=s, job_id=job_id).adapter_path
    assert path is not None
    return path


def _succeeded_in_store(api: Api, h: dict[str, str], peft_type: str) -> str:
    """A succeeded job whose final checkpoint (its adapter) is in the store, as a worker
    leaves it: the folder's objects, manifest last."""
    job_id = api.job_id(h)
    api.claim(job_id)
    folder = api.settings.data_dir.parent / "worker" / job_id / "step-3"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "mixlora.layers.0.mlp.moe_gate.weight": torch.randn(4, 16, generator=g),
        "mixlora.layers.0.mlp.up_proj.experts.0.lora_A.weight": torch.randn(2, 16, generator=g),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": peft_type, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    meta = {"kind": "mixlora", "base_model": {"name_or_path": "x/y", "path": "/srv/models/y"}}
    (folder / "mixloom_adapter.json").write_text(json.dumps(meta))
    (folder / "trainer_state.pt").write_bytes(b"optimizer state" * 100)
    (folder / "manifest.json").write_text("{}")
    store = _store(api)
    key = f"jobs/{job_id}/checkpoints/step-3"
    store.put_folder(folder, key, last="manifest.json")
    with api.ctx.db.transaction() as s:
        location = store.location(key)
        jobs.add_checkpoint(session=s, job_id=job_id, step=3, path=location, bytes=1500)
        jobs.set_adapter_path(session=s, job_id=job_id, path=location, bytes=900)
        jobs.release_job(session=s, job_id=job_id, worker_id="worker-1", status=JobStatus.SUCCEEDED)
    return job_id


def test_an_adapter_in_s3_streams_as_a_zip_and_deletes_remove_its_objects(s3_api: Api) -> None:
    api, c = s3_api, s3_api.client
    h = api.tenant()
    job_id = _succeeded_in_store(api, h, "MIXLORA")
    folder = api.settings.data_dir.parent / "worker" / job_id / "step-3"

    r = c.get(f"{JOBS}/{job_id}/adapter", headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(z.namelist()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "mixloom_adapter.json",
    ]
    assert (
        z.read("adapter_model.safetensors") == (folder / "adapter_model.safetensors").read_bytes()
    )
    assert json.loads(z.read("mixloom_adapter.json"))["base_model"] == {"name_or_path": "x/y"}

    ckpt = c.get(f"{JOBS}/{job_id}/checkpoints", headers=h).json()["data"][0]["id"]
    r = c.get(f"{JOBS}/{job_id}/checkpoints/{ckpt}/adapter?format=mixlora", headers=h)
    assert r.status_code == 200
    z = zipfile.ZipFile(io.BytesIO(r.content))
    loaded = torch.load(io.BytesIO(z.read("adapter_model.bin")), weights_only=True)
    expected = load_file(str(folder / "adapter_model.safetensors"))
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())

    store = _store(api)
    key = f"jobs/{job_id}/checkpoints/step-3"
    # deleting the checkpoints keeps the adapter that shares its folder: the trainer
    # state goes, the adapter's objects stay
    assert c.delete(f"{JOBS}/{job_id}/checkpoints", headers=h).status_code == 200
    assert store.list(key + "/") == [
        f"{key}/adapter_config.json",
        f"{key}/adapter_model.safetensors",
        f"{key}/mixloom_adapter.json",
    ]
    assert c.get(f"{JOBS}/{job_id}/adapter", headers=h).status_code == 200
    assert c.delete(f"{JOBS}/{job_id}/adapter", headers=h).status_code == 200
    assert store.list(key + "/") == []


def test_an_unreachable_store_is_503_with_retry_after_and_no_row(
    tmp_path: Path, sqlite_template: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for api in _api(
        tmp_path,
        sqlite_template,
        storage_url="s3://gone/mixloom",
        s3_endpoint_url=dead,
        s3_region="us-east-1",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
    ):
        h = api.tenant()
        r = api.upload(h)
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == str(objects.STORE_RETRY_AFTER_S)
        error = r.json()["error"]
        assert error["code"] == "storage_unavailable" and "object store" in error["message"]
        assert api.client.get("/v1/files", headers=h).json()["data"] == []
        assert not any(n.endswith((".part", ".jsonl")) for n in _local_files(api))


def test_the_sdk_follows_a_redirect_to_the_store_without_its_api_key(
    tmp_path: Path, moto: Moto
) -> None:
    from live_server import live_api

    from mixloom.clients import Client

    settings = {"storage_downloads": "redirect", **moto.settings("sdk")}
    with live_api(tmp_path / "data", **settings) as server:
        client = Client(server.url, api_key=server.new_key("sdk"), timeout=30)
        upload = tmp_path / "train.jsonl"
        upload.write_bytes(GOOD_JSONL)
        f = client.upload_file(upload)
        got = client.download_file(f.id, tmp_path / "back.jsonl")
        assert got.read_bytes() == GOOD_JSONL
