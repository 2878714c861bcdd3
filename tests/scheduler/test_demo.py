"""The README's main job: `bash scripts/demo.sh` serves SmolLM2-135M on the embedded default
and trains a LoRA and a MixLoRA job together through HTTP (minutes on a CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
from helpers import REPO


@pytest.mark.slow
def test_demo_script_end_to_end_on_smollm2(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXLOOM_")}
    env["STEPS"] = "4"
    done = subprocess.run(
        ["bash", "scripts/demo.sh", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "== preparing the base model" in done.stdout  # never silent while it converts
    assert "shared with 1 other job(s)" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {v["peft_type"] for v in summary.values()} == {"LORA", "MIXLORA"}
    for name in ("lora", "mixlora"):
        with zipfile.ZipFile(summary[name]["zip"]) as zf:
            assert sorted(zf.namelist()) == [  # the weights once
                "adapter_config.json",
                "adapter_model.safetensors",
                "mixloom_adapter.json",
            ]
            config = json.loads(zf.read("adapter_config.json"))
        assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # the data directory holds each checkpoint once: folders, no archives
    jobs = out / "server-data" / "jobs"
    assert not list(jobs.rglob("*.zip")) and not list(jobs.rglob("adapter_model.bin"))
