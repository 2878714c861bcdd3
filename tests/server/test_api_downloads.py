"""Adapter downloads: a stored adapter is a folder holding each file once; its zip is built as
it streams, holds the adapter's files only (never the trainer state, never the server's
paths), and `?format=mixlora` carries the `mixlora` package's adapter_model.bin instead of
the safetensors file, made from it on the way."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch
from api_support import Api
from safetensors.torch import save_file

from mixloom.storage import jobs
from mixloom.storage.records import JobStatus

JOBS = "/v1/fine_tuning/jobs"


def _stored_adapter(folder: Path, peft_type: str) -> dict[str, torch.Tensor]:
    """An adapter as the worker stores it: the final checkpoint's folder."""
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
    return tensors


def _succeeded(api: Api, headers: dict[str, str], folder: Path) -> str:
    job_id = api.job_id(headers)
    api.claim(job_id)
    with api.ctx.db.transaction() as s:
        jobs.add_checkpoint(session=s, job_id=job_id, step=3, path=str(folder), bytes=1500)
        jobs.set_adapter_path(session=s, job_id=job_id, path=str(folder), bytes=900)
        jobs.release_job(session=s, job_id=job_id, worker_id="worker-1", status=JobStatus.SUCCEEDED)
    return job_id


def test_a_stored_folder_downloads_as_a_zip_of_its_adapter_files(sqlite_api: Api) -> None:
    api, c = sqlite_api, sqlite_api.client
    h = api.tenant()
    folder = api.settings.data_dir / "jobs" / "j" / "checkpoints" / "step-3"
    tensors = _stored_adapter(folder, "MIXLORA")
    job_id = _succeeded(api, h, folder)

    r = c.get(f"{JOBS}/{job_id}/adapter", headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert f'filename="{job_id}-adapter.zip"' in r.headers["content-disposition"]
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(z.namelist()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "mixloom_adapter.json",
    ]  # one copy of the weights, no trainer state
    assert (
        z.read("adapter_model.safetensors") == (folder / "adapter_model.safetensors").read_bytes()
    )
    meta = json.loads(z.read("mixloom_adapter.json"))
    assert meta["base_model"] == {"name_or_path": "x/y"}  # the server's path stays home

    ckpt = c.get(f"{JOBS}/{job_id}/checkpoints", headers=h).json()["data"][0]["id"]
    r = c.get(f"{JOBS}/{job_id}/checkpoints/{ckpt}/adapter?format=mixlora", headers=h)
    assert r.status_code == 200
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(z.namelist()) == [
        "adapter_config.json",
        "adapter_model.bin",
        "mixloom_adapter.json",
    ]
    loaded = torch.load(io.BytesIO(z.read("adapter_model.bin")), weights_only=True)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)
        assert loaded[k].untyped_storage().nbytes() == v.numel() * 4  # its own bytes only
    assert sorted(p.name for p in folder.iterdir()) == [  # nothing was written to build it
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
        "mixloom_adapter.json",
        "trainer_state.pt",
    ]


def test_format_mixlora_is_for_mixlora_adapters_and_unknown_formats_are_refused(
    sqlite_api: Api,
) -> None:
    api, c = sqlite_api, sqlite_api.client
    h = api.tenant()
    folder = api.settings.data_dir / "jobs" / "l" / "checkpoints" / "step-3"
    _stored_adapter(folder, "LORA")
    job_id = _succeeded(api, h, folder)
    r = c.get(f"{JOBS}/{job_id}/adapter?format=mixlora", headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "format"
    assert "MixLoRA adapters" in r.json()["error"]["message"]
    r = c.get(f"{JOBS}/{job_id}/adapter?format=tar", headers=h)
    assert r.status_code == 400 and "format" in r.text
    assert c.get(f"{JOBS}/{job_id}/adapter", headers=h).status_code == 200
