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
    assert "shared with ['mixlora']" in done.stdout
    assert "shared with ['lora']" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {v["peft_type"] for v in summary.values()} == {"LORA", "MIXLORA"}
    with zipfile.ZipFile(summary["mixlora"]["zip"]) as zf:
        assert {"adapter_config.json", "adapter_model.bin", "adapter_model.safetensors"} <= set(
            zf.namelist()
        )
    with zipfile.ZipFile(summary["lora"]["zip"]) as zf:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(zf.namelist())
