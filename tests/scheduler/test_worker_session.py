"""The worker and `mixloom train` run a job through the same TrainingSession: the same
metrics record (metrics.jsonl has the fields GET .../metrics returns), and process-wide
malloc tuning only where a setting asks for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import arithmetic_rows, stack, wait_status, write_jsonl

from mixloom.cli import build_parser
from mixloom.config import Settings
from mixloom.scheduler.cli import _settings
from mixloom.scheduler.worker import Worker
from mixloom.storage.records import OPERATOR_METRICS
from mixloom.trainer import session as session_module
from mixloom.trainer.run import train
from mixloom.trainer.session import TrainingSession

METHOD = {
    "type": "mixlora",
    "mixlora": {
        "hyperparameters": {
            "r": 4,
            "lora_alpha": 8,
            "num_experts": 3,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.0,
            "max_seq_len": 32,
            "batch_size": 2,
            "max_steps": 3,
            "checkpoint_every": 2,
        }
    },
}


def _train_cli(tmp_path: Path, base: Path, data: Path, val: Path) -> list[dict[str, Any]]:
    config = {
        "base_model": str(base),
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
        "kernel_backend": "torch",
        "jobs": [
            {
                "name": "mx",
                "seed": 9,
                "training_file": str(data),
                "validation_file": str(val),
                "method": METHOD,
            }
        ],
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert train(path, progress=False) == {"mx": "succeeded"}
    text = (tmp_path / "runs" / "mx" / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_metrics_jsonl_has_the_fields_the_api_returns(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stepped_by: set[str] = set()
    real_step = TrainingSession.step

    def step(self: TrainingSession, names: Any = None) -> Any:
        stepped_by.add(self.worker_id)
        return real_step(self, names)

    monkeypatch.setattr(TrainingSession, "step", step)
    tuned: list[bool] = []
    monkeypatch.setattr(session_module, "tune_cpu_allocator", lambda: tuned.append(True))
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    val = write_jsonl(tmp_path / "val.jsonl", arithmetic_rows(4, seed=1))
    with stack(tmp_path, tiny_base) as s:
        client = s.client("vocabulary")
        f, v = client.upload_file(data), client.upload_file(val)
        model = client.list_models()[0].id
        job = client.create_job(
            training_file=f.id, validation_file=v.id, model=model, method=METHOD, seed=9
        )
        s.start_worker(worker_id="the-worker")
        wait_status(client, job.id, "succeeded")
        api = [m.raw for m in client.iter_metrics(job.id)]
    assert not tuned  # a worker shares its process (the API's, in `serve`): only when asked

    lines = _train_cli(tmp_path, tiny_base, data, val)
    assert tuned == [True]  # `mixloom train` on a CPU: unless MIXLOOM_CPU_MALLOC_TUNING=false
    assert "the-worker" in stepped_by and len(stepped_by) == 2  # both through the session

    first, lines = lines[0], lines[1:]
    assert first["step"] == 0 and set(first["metrics"]) == {"valid_loss"}  # the starting point
    assert [x["step"] for x in lines] == [x["step"] for x in api] == [1, 2, 3]
    for mine, theirs in zip(lines, api, strict=True):
        assert set(mine) == set(theirs) == {"object", "step", "created_at", "metrics"}
        # a tenant never sees which worker trained a step; `mixloom train`'s own file may
        assert set(mine["metrics"]) - OPERATOR_METRICS == set(theirs["metrics"]), mine["step"]
        assert mine["metrics"]["train_loss"] == pytest.approx(theirs["metrics"]["train_loss"])
    assert {"train_loss", "learning_rate", "tokens_per_second", "router_load", "shared_with"} <= (
        set(api[0]["metrics"])
    )
    assert "valid_loss" in api[-1]["metrics"] and "valid_loss" in lines[-1]["metrics"]


def test_worker_settings_come_from_the_environment_and_flags(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIXLOOM_WORKER_MAX_JOBS", "3")
    monkeypatch.setenv("MIXLOOM_WORKER_LEASE_SECONDS", "12")
    args = build_parser().parse_args(["worker", "--lease-seconds", "6", "--worker-id", "w"])
    settings = _settings(args)
    assert (settings.worker_max_jobs, settings.worker_lease_seconds) == (3, 6.0)
    assert (settings.worker_id, settings.worker_heartbeat) == ("w", 2.0)

    tuned: list[bool] = []
    monkeypatch.setattr(session_module, "tune_cpu_allocator", lambda: tuned.append(True))
    for asked in (None, False, True):
        settings = Settings(
            data_dir=tmp_path,
            base_model=str(tiny_base),
            device="cpu",
            kernel_backend="torch",
            cpu_malloc_tuning=asked,
        )
        Worker(settings, db=None, bus=None)._load()  # type: ignore[arg-type]
    assert tuned == [True]  # only the worker whose setting asked
