"""`mixloom models|files|jobs|adapters` against a live server: every command, both output
forms, and the server's error messages on stderr with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from live_server import LiveServer, ScriptedWorker

from mixloom.clients.cli import parse_hyperparameter


def _json(cli: Any, *args: str) -> Any:
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_models_and_files(cli: Any, train_file: Path) -> None:
    code, out, _ = cli("models", "list")
    assert code == 0 and "smollm2-135m" in out
    code, out, _ = cli("files", "upload", str(train_file))
    file_id, name, rows = out.strip().split("\t")
    assert code == 0 and file_id.startswith("file-") and name == "train.jsonl" and rows == "20 rows"
    assert _json(cli, "files", "get", file_id)["rows"] == 20
    second = _json(cli, "files", "upload", str(train_file))["id"]
    code, out, _ = cli("files", "list", "--limit", "1")
    assert second in out and file_id not in out and f"--after {second}" in out
    assert [f["id"] for f in _json(cli, "files", "list", "--all", "--limit", "1")] == [
        second,
        file_id,
    ]
    code, out, _ = cli("files", "delete", second)
    assert code == 0 and f"deleted {second}" in out
    code, _, err = cli("files", "get", second)
    assert code == 2 and "no file" in err


def test_jobs_commands(cli: Any, train_file: Path) -> None:
    code, out, err = cli(
        "jobs", "create", "--training-file", str(train_file), "--method", "mixlora",
        "--hp", "r=4", "--hp", "num_experts=4", "--hp", "target_modules=q_proj,v_proj",
        "--hp", "learning_rate=1e-3", "--suffix", "cli",
    )  # fmt: skip
    assert code == 0 and "uploaded" in err
    job_id, status = out.strip().split("\t")
    assert status == "queued"
    job = _json(cli, "jobs", "get", job_id)
    hp = job["method"]["mixlora"]["hyperparameters"]
    assert (hp["r"], hp["num_experts"], hp["target_modules"], hp["learning_rate"]) == (
        4, 4, ["q_proj", "v_proj"], 1e-3,
    )  # fmt: skip

    code, out, _ = cli("jobs", "get", job_id)
    assert code == 0 and "queue position: 1" in out and "step 0/3" in out  # 20 rows / 8
    code, out, _ = cli("jobs", "list")
    assert job_id in out and "mixlora" in out
    assert _json(cli, "jobs", "pause", job_id)["status"] == "paused"
    assert _json(cli, "jobs", "list", "--status", "paused")[0]["id"] == job_id
    code, out, _ = cli("jobs", "resume", job_id)
    assert code == 0 and "queued" in out
    code, out, _ = cli("jobs", "cancel", job_id)
    assert code == 0 and "cancelled" in out
    code, out, _ = cli("jobs", "events", job_id)
    lines = out.strip().splitlines()
    # created, waiting for a worker (none runs here), paused, resumed, cancelled
    assert "Job created" in lines[0] and "Job cancelled" in lines[-1] and len(lines) == 5
    assert "Waiting for a worker that holds base" in lines[1]
    code, out, _ = cli("jobs", "watch", job_id)
    assert code == 1 and f"{job_id} cancelled" in out


def test_watch_shows_progress_and_loss_then_download(
    cli: Any, server: LiveServer, train_file: Path, tmp_path: Path
) -> None:
    file_id = _json(cli, "files", "upload", str(train_file))["id"]
    job_id = _json(cli, "jobs", "create", "--training-file", file_id)["id"]
    worker = ScriptedWorker(server, steps=6, tick=0.15)
    worker.start(job_id)
    try:
        code, out, err = cli("jobs", "watch", job_id)
    finally:
        worker.close()
    assert code == 0 and f"{job_id} succeeded" in out
    assert "6/6" in err and "loss=" in err and "step" in err  # the tqdm bar
    assert "Checkpoint saved at step 3" in err and "Job succeeded" in err

    code, out, _ = cli("jobs", "get", job_id)
    assert "step 6/6 (100%)" in out and "loss 0." in out and "adapters download" in out
    code, out, _ = cli("adapters", "download", job_id, "-o", str(tmp_path))
    path = Path(out.strip())
    assert code == 0 and path.parent == tmp_path and zipfile.is_zipfile(path)
    # a directory that does not exist yet, written with a '/': the server's file name in it
    code, out, _ = cli("adapters", "download", job_id, "-o", f"{tmp_path / 'dl'}/")
    assert code == 0 and Path(out.strip()) == tmp_path / "dl" / f"{job_id}-adapter.zip"
    assert zipfile.is_zipfile(tmp_path / "dl" / f"{job_id}-adapter.zip")
    code, out, _ = cli("adapters", "download", job_id, "-o", f"{tmp_path / 'x'}/", "--extract")
    folder = Path(out.strip())
    assert code == 0 and folder == tmp_path / "x" / f"{job_id}-adapter"
    assert (folder / "adapter_config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [folder.name]  # no leftovers
    code, out, _ = cli("adapters", "download", job_id, "-o", str(tmp_path / "here"), "--extract")
    assert code == 0 and (tmp_path / "here" / "adapter_config.json").is_file()
    (ckpt,) = [e for e in _json(cli, "jobs", "events", job_id) if e["type"] == "checkpoint"]
    got = _json(
        cli, "adapters", "download", job_id, "--checkpoint", ckpt["data"]["checkpoint_id"],
        "-o", str(tmp_path / "step3.zip"),
    )  # fmt: skip
    assert got["path"] == str(tmp_path / "step3.zip") and got["bytes"] > 0


def test_delete_adapter_and_checkpoints_then_usage(
    cli: Any, server: LiveServer, train_file: Path
) -> None:
    file_id = _json(cli, "files", "upload", str(train_file))["id"]
    job_id = _json(cli, "jobs", "create", "--training-file", file_id)["id"]
    code, _, err = cli("adapters", "delete", job_id)
    assert code == 2 and f"job {job_id} is queued" in err
    ScriptedWorker(server, steps=4, tick=0.01).run_job(job_id)
    code, out, _ = cli("adapters", "delete", job_id, "--all-checkpoints")
    assert code == 0 and f"deleted 1 checkpoint(s) of {job_id}" in out
    assert _json(cli, "adapters", "delete", job_id, "--all-checkpoints") == []
    code, out, _ = cli("adapters", "delete", job_id)
    assert code == 0 and f"deleted the adapter of {job_id}" in out
    code, _, err = cli("adapters", "download", job_id)
    assert code == 2 and "was deleted" in err
    code, out, _ = cli("usage")
    assert code == 0 and "checkpoints" in out and "QUOTA" in out and "largest upload" in out
    usage = _json(cli, "usage")
    assert usage["stored_bytes"] == usage["file_bytes"] > 0


def test_suffix_metadata_and_models(
    cli: Any, train_file: Path, finish: Callable[[str], str]
) -> None:
    file_id = _json(cli, "files", "upload", str(train_file))["id"]
    job = _json(
        cli, "jobs", "create", "--training-file", file_id, "--suffix", "cli-bot",
        "--metadata", "team=search", "--metadata", "run=3",
    )  # fmt: skip
    assert (job["suffix"], job["metadata"]) == ("cli-bot", {"team": "search", "run": "3"})
    code, out, _ = cli("jobs", "get", job["id"])
    assert "suffix: cli-bot" in out and "metadata team: search" in out and "metadata run: 3" in out
    code, out, _ = cli("jobs", "list")
    assert "cli-bot" in out and "SUFFIX" in out
    code, _, err = cli("jobs", "create", "--training-file", file_id, "--metadata", "team")
    assert code == 2 and "write KEY=VALUE" in err

    name = finish(job["id"])
    code, out, _ = cli("jobs", "get", job["id"])
    assert f"model: {name}" in out
    code, out, _ = cli("models", "list")
    assert code == 0 and "smollm2-135m" in out and name in out and job["organization_id"] in out
    assert _json(cli, "models", "get", name)["fine_tuning_job_id"] == job["id"]
    code, out, _ = cli("models", "delete", name)
    assert code == 0 and out.strip() == f"deleted {name}"
    assert _json(cli, "models", "delete", name) == {"id": name, "object": "model", "deleted": True}
    code, _, err = cli("models", "get", name)
    assert code == 2 and "was deleted" in err
    code, _, err = cli("models", "delete", "smollm2-135m")
    assert code == 2 and "cannot be deleted" in err


def test_errors_print_the_server_message(cli: Any, train_file: Path, monkeypatch: Any) -> None:
    code, _, err = cli("adapters", "download", "ftjob-nope")
    assert code == 2 and "no job with id 'ftjob-nope'" in err
    code, _, err = cli(
        "jobs", "create", "--training-file", str(train_file), "--hp", "r=0", "--hp", "rank=8"
    )
    assert code == 2 and "2 problems" in err and "hyperparameters.rank" in err
    code, _, err = cli("jobs", "create", "--training-file", "file-x", "--hp", "oops")
    assert code == 2 and "write NAME=VALUE" in err
    code, _, err = cli("jobs", "create", "--training-file", "file-x", "--hp", "lora_alpha=1e400")
    assert code == 2 and "give a finite number" in err
    monkeypatch.setenv("MIXLOOM_API_KEY", "mxl-wrong")
    code, _, err = cli("jobs", "list")
    assert code == 2 and "refused the API key" in err and "--api-key" in err


def test_errors_say_what_to_type_next(
    cli: Any, server: LiveServer, train_file: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """Each error of a client command points the way: a missing local file is one (not an
    unknown file id), a missing key names --api-key and MIXLOOM_API_KEY, a server that is
    not there names `mixloom serve`, an adapter not ready names `jobs watch`."""
    code, _, err = cli("jobs", "create", "--training-file", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "nope.jsonl: no such local file" in err
    assert "mixloom files upload" in err and "POST /v1/files" not in err
    code, _, err = cli("jobs", "create", "--training-file", "file-0123")
    assert code == 2 and "no file with id 'file-0123'" in err and "mixloom files upload" in err
    code, _, err = cli("files", "upload", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "no such file" in err and "Traceback" not in err
    job_id = _json(cli, "jobs", "create", "--training-file", str(train_file))["id"]
    code, _, err = cli("adapters", "download", job_id)
    assert code == 2 and "mixloom jobs watch" in err
    code, _, err = cli("jobs", "get", "ftjob-0000")
    assert code == 2 and "mixloom jobs list" in err
    code, _, err = cli("generate", "--adapter", str(tmp_path / "gone"), "--prompt", "hi")
    assert code == 2 and "no such file or folder" in err
    code, _, err = cli("adapters", "download", job_id, "-o", "/proc/no/such/dir/a.zip")
    assert code == 2 and "Traceback" not in err

    monkeypatch.delenv("MIXLOOM_API_KEY")
    code, _, err = cli("jobs", "list")
    assert code == 2 and "--api-key" in err and "MIXLOOM_API_KEY" in err
    assert "Authorization" not in err
    code, _, err = cli("jobs", "list", "--base-url", "http://127.0.0.1:9", "--api-key", "k")
    assert code == 2 and "cannot reach" in err and "mixloom serve" in err


def test_hyperparameter_values() -> None:
    assert parse_hyperparameter("r=16") == ("r", 16)
    assert parse_hyperparameter("learning_rate=2e-4") == ("learning_rate", 2e-4)
    assert parse_hyperparameter("use_dora=true") == ("use_dora", True)
    assert parse_hyperparameter("routing=top_p") == ("routing", "top_p")
    assert parse_hyperparameter("target_modules=q_proj, v_proj") == (
        "target_modules",
        ["q_proj", "v_proj"],
    )
    assert parse_hyperparameter('expert_lora={"r": 4}') == ("expert_lora", {"r": 4})


def test_installed_entry_point(server: LiveServer, api_key: str) -> None:
    env = dict(os.environ, MIXLOOM_API_KEY=api_key)
    exe = Path(sys.executable).with_name("mixloom")
    result = subprocess.run(
        [str(exe), "jobs", "list", "--base-url", server.url, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
