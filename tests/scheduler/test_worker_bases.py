"""Several base models in one deployment (MIXLOOM_BASE_MODELS), on Postgres and Redis: two
tiny bases of different shapes, each held by its own `mixloom worker` process; a job on each
base trains on that base, by its worker alone, and its adapter names that base; inference on
a fine-tuned model goes to its base's worker; `/v1/models` lists every base; a job for a
listed base no worker holds waits with one event saying so; an unknown base is a 400; the
registry shows each worker and its base, and a worker that exits cleanly leaves it."""

from __future__ import annotations

import json
import signal
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import arithmetic_rows, stack, wait_for, wait_status, workers_by_step, write_jsonl
from safetensors.torch import load_file
from tiny import save_tiny_base

from mixloom.storage import inference, workers

METHOD = {
    "type": "lora",
    "lora": {
        "hyperparameters": {
            "r": 4,
            "lora_alpha": 8,
            "learning_rate": 4e-3,
            "warmup_ratio": 0.0,
            "max_seq_len": 32,
            "batch_size": 4,
            "max_steps": 3,
            "target_modules": ["q_proj", "v_proj"],
        }
    },
}
WAITING = "Waiting for a worker that holds base {}: none is running"


def _adapter(zip_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """adapter_config.json and the tensors' shapes of an adapter archive."""
    with zipfile.ZipFile(zip_path) as zf:
        config = json.loads(zf.read("adapter_config.json"))
        zf.extract("adapter_model.safetensors", zip_path.parent / zip_path.stem)
    tensors = load_file(str(zip_path.parent / zip_path.stem / "adapter_model.safetensors"))
    return config, {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize(
    "workers_as",
    [
        "threads",  # the same Worker in this process: the default suite's proof
        pytest.param("processes", marks=pytest.mark.slow),  # `mixloom worker`: ~70 s on 2 cores
    ],
)
def test_two_bases_two_workers_each_job_on_its_own_base(
    tmp_path: Path, pg_url: str, redis: str, workers_as: str
) -> None:
    base_a = save_tiny_base(tmp_path / "tiny-a")  # hidden 64
    base_b = save_tiny_base(tmp_path / "tiny-b", seed=1, hidden_size=96, intermediate_size=128)
    listed = f"tiny-a={base_a}|org/tiny-a,tiny-b={base_b}|org/tiny-b,tiny-c={tmp_path / 'tiny-c'}"
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16, seed=3))
    with stack(tmp_path, base_a, database_url=pg_url, redis_url=redis, base_models=listed) as s:
        client = s.client("bases")
        for base in ("tiny-a", "tiny-b"):
            if workers_as == "processes":
                s.spawn_worker(f"w-{base}", base_models=listed, worker_base_model=base)
            else:
                s.start_worker(worker_id=f"w-{base}", worker_base_model=base)

        def registered() -> dict[str, workers.WorkerRecord]:
            with s.db.transaction() as session:
                rows = workers.list_workers(session=session, include_dead=False)
            return {w.id: w for w in rows if w.id in ("w-tiny-a", "w-tiny-b")}

        live = wait_for(lambda: len(registered()) == 2 and registered(), timeout=180)
        assert {(w.id, w.base, w.source, w.role, w.devices) for w in live.values()} == {
            ("w-tiny-a", "tiny-a", str(base_a), "all", "cpu"),
            ("w-tiny-b", "tiny-b", str(base_b), "all", "cpu"),
        }

        f = client.upload_file(data)
        ids = {
            base: client.create_job(training_file=f.id, model=base, method=METHOD, seed=5).id
            for base in ("tiny-a", "tiny-b", "tiny-c")
        }
        for base in ("tiny-a", "tiny-b"):
            wait_status(client, ids[base], "succeeded", timeout=180)

        # each job trained on its own base, by that base's worker alone
        hidden = {"tiny-a": 64, "tiny-b": 96}
        for base in ("tiny-a", "tiny-b"):
            job = client.get_job(ids[base])
            assert job.fine_tuned_model == f"ft:{base}:{job.organization_id}::{job.id}"
            assert set(workers_by_step(s.db, job.id).values()) == {f"w-{base}"}
            config, shapes = _adapter(client.download_adapter(job.id, tmp_path / f"{base}.zip"))
            assert config["base_model_name_or_path"] == f"org/{base}"
            q_a = next(v for k, v in shapes.items() if "q_proj.lora_A" in k)
            assert q_a == (4, hidden[base]), shapes
            messages = [e.message for e in client.iter_events(job.id)]
            assert WAITING.format(base) not in messages

        # inference on a fine-tuned model goes to the worker that holds its base
        for base in ("tiny-a", "tiny-b"):
            model = client.get_job(ids[base]).fine_tuned_model
            assert model is not None
            answer = client.complete(model, "1+2=", max_tokens=2, temperature=0)
            with s.db.transaction() as session:
                request = inference.get(session=session, request_id=answer.id)
            assert request.worker_id == f"w-{base}"

        # /v1/models: every base, in the operator's order, then the tenant's models
        listed_ids = [m.id for m in client.list_models()]
        assert listed_ids[:3] == ["tiny-a", "tiny-b", "tiny-c"]
        assert {m.split(":")[1] for m in listed_ids[3:]} == {"tiny-a", "tiny-b"}

        # a listed base that no worker holds: queued, told once
        waiting = client.get_job(ids["tiny-c"])
        assert waiting.status == "queued"
        events = [e.message for e in client.iter_events(waiting.id)]
        assert events.count(WAITING.format("tiny-c")) == 1, events

        # a base that is not listed: 400 naming `model` and the bases
        r = httpx.post(
            f"{s.url}/v1/fine_tuning/jobs",
            headers={"Authorization": f"Bearer {client.api_key}"},
            json={"model": "tiny-z", "training_file": f.id},
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "model" and "tiny-a, tiny-b, tiny-c" in error["message"]

        # a clean exit leaves the registry; the other worker stays
        if workers_as == "processes":
            s.procs[0].send_signal(signal.SIGTERM)
            assert s.procs[0].wait(timeout=120) == 0
        else:
            s.stops[0].set()
            s.threads[0].join(timeout=120)
            assert not s.threads[0].is_alive()
        assert set(registered()) == {"w-tiny-b"}
