"""`mixloom train` on the real embedded base (SmolLM2-135M-Instruct) with a LoRA and a
MixLoRA job on a small real instruction set: both validation losses go down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mixloom.cli import main

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "alpaca_demo_200.jsonl"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_two_jobs_on_smollm2_lower_both_losses(tmp_path: Path) -> None:
    rows = DATA.read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:160]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(rows[180:196]) + "\n")
    hp = {
        "learning_rate": 2e-3,
        "batch_size": 4,
        "max_steps": 20,
        "max_seq_len": 192,
        "warmup_ratio": 0.1,
    }
    jobs = [
        {
            "name": "lora",
            "training_file": "train.jsonl",
            "validation_file": "val.jsonl",
            "seed": 1,
            "method": {"type": "lora", "lora": {"hyperparameters": hp}},
        },
        {
            "name": "mixlora",
            "training_file": "train.jsonl",
            "validation_file": "val.jsonl",
            "seed": 2,
            "method": {"type": "mixlora", "mixlora": {"hyperparameters": {**hp, "num_experts": 4}}},
        },
    ]
    cfg = {"base_model": "smollm2-135m", "output_dir": "out", "jobs": jobs}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "train.yaml"), "--no-progress"]) == 0
    for name in ("lora", "mixlora"):
        lines = [
            json.loads(x)
            for x in (tmp_path / "out" / name / "metrics.jsonl").read_text().splitlines()
        ]
        start, end = lines[0], lines[-1]
        assert start["step"] == 0 and end["step"] == 20
        before, after = start["metrics"]["valid_loss"], end["metrics"]["valid_loss"]
        print(name, "valid_loss", before, "->", after)
        assert after < before - 0.02  # eval is deterministic
