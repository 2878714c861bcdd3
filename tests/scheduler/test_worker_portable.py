"""Adapters a server trained load anywhere: adapter_config.json names the base by its public
id (MIXLOOM_BASE_MODEL_HUB_ID for a local folder), never by the server's path, so PEFT (LoRA)
and the `mixlora` package (MixLoRA) on another machine load them, in a fresh process that
has the base under that id and no access to the server's folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import arithmetic_rows, stack, wait_status, write_jsonl

import mixloom

HUB_ID = "acme/tiny-chat"
IDS = [[5, 9, 14, 30, 41, 7], [11, 3, 60, 2, 19, 8]]

# Run with the cwd holding acme/tiny-chat/ (how transformers resolves a hub id offline,
# beside the Hugging Face cache): each loader reads base_model_name_or_path itself.
LOADERS = """
import json, sys, torch
from peft import AutoPeftModelForCausalLM
from mixlora import MixLoraModelForCausalLM
from mixloom.interop import mixlora_eval
ids = torch.tensor(json.loads(sys.argv[3]))
lora = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()
mix, _ = MixLoraModelForCausalLM.from_pretrained(sys.argv[2], torch_dtype=torch.float32)
mixlora_eval(mix)
with torch.no_grad():
    out = {"lora": lora(input_ids=ids).logits.tolist(), "mixlora": mix(input_ids=ids).logits.tolist()}
print(json.dumps(out))
"""


def test_a_downloaded_adapter_loads_in_peft_and_mixlora_by_the_bases_public_id(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(8, seed=3))
    hp = dict(r=4, lora_alpha=8, lora_dropout=0.05, learning_rate=3e-3, max_seq_len=32)
    hp.update(batch_size=2, max_steps=2, warmup_ratio=0.0)
    downloads = tmp_path / "downloads"
    with stack(tmp_path, tiny_base, base_model_hub_id=HUB_ID) as s:
        client = s.client("portable")
        f = client.upload_file(data)
        model = client.list_models()[0].id
        lora = client.create_job(
            training_file=f.id,
            model=model,
            method={"type": "lora", "lora": {"hyperparameters": hp}},
        )
        mix = client.create_job(
            training_file=f.id,
            model=model,
            method={"type": "mixlora", "mixlora": {"hyperparameters": {**hp, "num_experts": 3}}},
        )
        s.start_worker()
        for job in (lora, mix):
            wait_status(client, job.id, "succeeded")
        lora_dir = client.download_adapter(lora.id, downloads / "lora", extract=True)
        mix_dir = client.download_adapter(
            mix.id, downloads / "mixlora", extract=True, format="mixlora"
        )
    assert sorted(p.name for p in mix_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.bin",
        "mixloom_adapter.json",
    ]
    for folder in (lora_dir, mix_dir):
        assert (
            json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
            == HUB_ID
        )
        for p in folder.iterdir():  # no file names a folder of the server
            assert str(tmp_path).encode() not in p.read_bytes(), p.name

    # another machine: the base under its public id, the server's folders out of reach
    elsewhere = tmp_path / "laptop"
    shutil.copytree(tiny_base, elsewhere / HUB_ID)
    shutil.move(tiny_base, tmp_path / "server-base-gone")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(elsewhere / "hf-home"),
        "HOME": str(elsewhere),
        "XDG_CACHE_HOME": str(elsewhere / "cache"),
    }
    env.pop("MIXLOOM_BASE_MODEL", None)
    run = subprocess.run(
        [sys.executable, "-c", LOADERS, str(lora_dir), str(mix_dir), json.dumps(IDS)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])

    # mixloom's own loader resolves the same public id (and gives the same logits)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ids = torch.tensor(IDS)
    for name, folder in (("lora", lora_dir), ("mixlora", mix_dir)):
        ours = mixloom.load_adapter_model(None, folder, dtype="float32", device="cpu")
        with torch.no_grad():
            mine = ours(input_ids=ids).logits
        torch.testing.assert_close(mine, torch.tensor(theirs[name]), atol=1e-4, rtol=1e-4)
