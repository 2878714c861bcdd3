"""Two tenants' jobs trained in the same fused steps on the tiny model: each tenant learns
how many other jobs shared its steps, never which, and nothing it can read (its job, its
lists, events, metrics, checkpoints, the live stream) names the other tenant's objects, or
the worker process that trained them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from helpers import arithmetic_rows, metrics, stack, wait_status, write_jsonl

from mixloom.storage import tenants

METHOD = {
    "type": "lora",
    "lora": {
        "hyperparameters": {
            "r": 4,
            "lora_alpha": 8,
            "learning_rate": 4e-3,
            "warmup_ratio": 0.0,
            "max_seq_len": 64,
            "batch_size": 2,
            "max_steps": 4,
        }
    },
}


def _everything_readable(base: str, key: str, job_id: str) -> str:
    """Every response body tenant `key` can get about its job, concatenated."""
    paths = [
        f"/v1/fine_tuning/jobs/{job_id}",
        "/v1/fine_tuning/jobs?limit=100",
        f"/v1/fine_tuning/jobs/{job_id}/events?limit=100",
        f"/v1/fine_tuning/jobs/{job_id}/metrics?limit=100",
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints?limit=100",
        f"/v1/fine_tuning/jobs/{job_id}/stream",  # a finished job's stream ends by itself
        "/v1/files",
    ]
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http:
        bodies = []
        for path in paths:
            r = http.get(path, timeout=30)
            assert r.status_code == 200, (path, r.text)
            bodies.append(r.text)
    return "\n".join(bodies)


def test_shared_steps_are_counted_never_named(tmp_path: Path, tiny_base: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))
    with stack(tmp_path, tiny_base) as s:
        alice, bob = s.client("alice"), s.client("bob")
        model = alice.list_models()[0].id
        ids: dict[str, Any] = {}
        for name, client in (("alice", alice), ("bob", bob)):
            f = client.upload_file(data)
            job = client.create_job(training_file=f.id, model=model, method=METHOD)
            ids[name] = {"file": f.id, "job": job.id, "key": client.api_key}
        s.start_worker(worker_id="a-host:4242")
        for name, client in (("alice", alice), ("bob", bob)):
            wait_status(client, ids[name]["job"], "succeeded")

        shared = [m.metrics["shared_with"] for m in metrics(alice, ids["alice"]["job"])]
        assert shared == [1, 1, 1, 1], shared  # bob's job, in every step: counted only
        with s.db.transaction() as session:
            bob_tenant = tenants.get_tenant(session=session, tenant="bob").id
        seen = _everything_readable(s.url, ids["alice"]["key"], ids["alice"]["job"])
        for secret in (ids["bob"]["job"], ids["bob"]["file"], bob_tenant, ids["bob"]["key"]):
            assert secret not in seen, secret
        assert "a-host:4242" not in seen  # nor which worker process trained it
