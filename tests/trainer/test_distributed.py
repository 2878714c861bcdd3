"""Data parallel training (trainer/distributed.py): `torchrun --nproc-per-node 2 -m mixloom
train CONFIG` on CPU (gloo) gives the adapters the same config gives in one process.

Tolerance: fp32 on a CPU, the two runs differ only in the order of float sums (a rank's
rows padded to its own width, its gradients and router statistics summed across the ranks
before the one-process total), so a weight moves by rounding only: measured at most
6e-8 apart (LoRA 6.0e-8, MixLoRA 4.5e-8, DPO 2.8e-8) on lora_B weights that training moved
by 2.0-2.5e-3 from zero; the test allows 1e-5 and asserts that each adapter moved by more
than 100 times that (a load-balance loss made from one process's router statistics alone
misses by 3.7e-3)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import save_tiny_base

from mixloom.cli import main
from mixloom.trainer.distributed import micro_batch_sizes

TOLERANCE = 1e-5
TORCHRUN_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_data(folder: Path, rows: int, pairs: int) -> None:
    """Short rows of different lengths (so that every batch is padded): prompt/completion
    rows in sft.jsonl, preference pairs in pairs.jsonl."""
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "it",
        "rains",
    ]
    with open(folder / "sft.jsonl", "w") as f:
        for i in range(rows):
            prompt = " ".join(words[: 2 + i % 5])
            f.write(json.dumps({"prompt": prompt, "completion": " ".join(words[i % 4 : 6])}) + "\n")
    with open(folder / "pairs.jsonl", "w") as f:
        for i in range(pairs):
            turn = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
            row = {
                "input": {"messages": [{"role": "user", "content": " ".join(words[: 1 + i])}]},
                "preferred_output": turn(" ".join(words[i : i + 3])),
                "non_preferred_output": turn(" ".join(words[: 2 + i % 3])),
            }
            f.write(json.dumps(row) + "\n")


def _config(tmp_path: Path, output_dir: str) -> Path:
    """A fused group of three jobs, each with dropout and gradient accumulation: LoRA, MixLoRA
    (router jitter, a load-balance loss worth its name) and DPO (LoRA)."""
    train = {"learning_rate": 1e-3, "batch_size": 4, "max_seq_len": 96}
    jobs = [
        {
            "name": "lo",
            "training_file": "sft.jsonl",
            "seed": 3,
            "method": {
                "type": "lora",
                "lora": {
                    "hyperparameters": {**train, "micro_batch_size": 2, "r": 4, "lora_dropout": 0.1}
                },
            },
        },
        {
            "name": "mx",
            "training_file": "sft.jsonl",
            "seed": 4,
            "method": {
                "type": "mixlora",
                "mixlora": {
                    "hyperparameters": {
                        **train,
                        "r": 4,
                        "num_experts": 3,
                        "lora_dropout": 0.1,
                        "jitter_noise": 0.05,
                        "router_aux_loss_coef": 0.5,
                    }
                },
            },
        },
        {
            "name": "dpo",
            "training_file": "pairs.jsonl",
            "seed": 5,
            "method": {
                "type": "dpo",
                "dpo": {
                    "hyperparameters": {**train, "micro_batch_size": 2, "beta": 0.1},
                    "adapter": {"type": "lora", "hyperparameters": {"r": 4, "lora_dropout": 0.1}},
                },
            },
        },
    ]
    cfg = {
        "base_model": "base",
        "output_dir": output_dir,
        "device": "cpu",
        "dtype": "float32",
        "recompute": True,  # the GPU default: dropout masks redrawn in the backward
        "jobs": jobs,
    }
    path = tmp_path / f"{output_dir}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(config: Path, nproc: int) -> subprocess.CompletedProcess[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "-m",
            "mixloom",
            "train",
            str(config),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=TORCHRUN_TIMEOUT_S,
    )


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "rng",  # dropout bits: the CPU's stream, the GPU's counter-based kernel (interpreted here)
    ["stream", pytest.param("counter", marks=pytest.mark.slow)],
)
def test_torchrun_two_processes_equal_one(
    rng: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIXLOOM_DROPOUT_RNG", rng)  # this process's run and torchrun's
    save_tiny_base(tmp_path / "base")
    _write_data(tmp_path, rows=12, pairs=8)  # 3 steps of 4 rows; 2 steps of 4 pairs

    assert main(["train", str(_config(tmp_path, "one")), "--no-progress"]) == 0
    run = _torchrun(_config(tmp_path, "two"), 2)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("lo: succeeded") == 2  # both ranks trained to the end

    for name in ("lo", "mx", "dpo"):
        one, two = _adapter(tmp_path / "one" / name), _adapter(tmp_path / "two" / name)
        assert one.keys() == two.keys()
        worst = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert worst <= TOLERANCE, f"{name}: {worst:.3g} apart"
        # the lora_B weights start at zero: what training moved them, far above the tolerance
        moved = max(float(one[k].abs().max()) for k in one if "lora_B" in k)
        assert moved > 100 * TOLERANCE, f"{name}: trained too little to compare ({moved:.3g})"

        # rank 0 alone wrote the metrics: one record per step, the one-process losses
        def losses(run: str, job: str = name) -> list[float]:
            text = (tmp_path / run / job / "metrics.jsonl").read_text().splitlines()
            return [json.loads(x)["metrics"]["train_loss"] for x in text]

        assert losses("two") == pytest.approx(losses("one"), rel=1e-5)
    mx = (tmp_path / "two" / "mx" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(mx[-1])["metrics"]["aux_loss"] > 0


def test_a_micro_batch_smaller_than_the_group_is_an_error(tmp_path: Path) -> None:
    # 12 rows in micro-batches of 2, and an epoch's last step of 3 ends in one row alone
    assert micro_batch_sizes(12, 4, 2) == {2}
    assert micro_batch_sizes(11, 4, 2) == {2, 1}
    assert micro_batch_sizes(3, 4, 4) == {3}
    save_tiny_base(tmp_path / "base")
    _write_data(tmp_path, rows=5, pairs=0)
    cfg = {
        "base_model": "base",
        "device": "cpu",
        "jobs": [
            {
                "name": "short",
                "training_file": "sft.jsonl",
                "method": {"type": "lora", "lora": {"hyperparameters": {"batch_size": 2}}},
            }
        ],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = _torchrun(path, 2)
    assert run.returncode != 0
    assert "job 'short': a micro-batch of 1 example cannot be split across 2 processes" in (
        run.stderr
    )
