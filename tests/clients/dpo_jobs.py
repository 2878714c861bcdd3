"""A DPO job and its metrics written straight through the storage layer, with the keys the
DPO trainer writes (trainer/session.py's names plus TRL's rewards_*, reward_margin,
reward_accuracy and logps_*), for the CLI and dashboard tests: no worker trains DPO here."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from live_server import LiveServer

from mixloom.jobspec import Method
from mixloom.storage import files, jobs, models, tenants
from mixloom.storage.records import JobStatus

DPO_MIXLORA = Method.model_validate(
    {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {"beta": 0.1, "n_epochs": 1, "batch_size": 8},
            "adapter": {"type": "mixlora", "hyperparameters": {"num_experts": 4}},
        },
    }
).to_json()

PAIR = (
    b'{"input": {"messages": [{"role": "user", "content": "2+2="}]}, '
    b'"preferred_output": [{"role": "assistant", "content": "4"}], '
    b'"non_preferred_output": [{"role": "assistant", "content": "5"}]}\n'
)
PAIRS = 48  # 6 optimizer steps of 8 pairs
STEPS = 6
# the share of a step's 8 pairs whose chosen answer has the larger reward
ACCURACY = (0.5, 0.625, 0.625, 0.75, 0.875, 0.875)


def dpo_values(step: int, *, final: bool = False) -> dict[str, Any]:
    """Step `step`'s record: rewards that part as training goes on, the DPO loss of their
    margin (-log sigmoid(margin): the rewards already carry beta), and at the last step
    the validation rows' loss and accuracy."""
    chosen, rejected = 0.04 * step, -0.03 * step
    margin = chosen - rejected
    values: dict[str, Any] = {
        "train_loss": math.log1p(math.exp(-margin)),
        "rewards_chosen": chosen,
        "rewards_rejected": rejected,
        "reward_margin": margin,
        "reward_accuracy": ACCURACY[step - 1],
        "logps_chosen": -12.0 + 0.4 * step,
        "logps_rejected": -14.0 - 0.3 * step,
        "learning_rate": 2e-4 * (1 - step / (STEPS + 1)),
        "grad_norm": 1.5 - 0.1 * step,
        "epoch": step / STEPS,
        "total_steps": STEPS,
        "tokens": 256,
        "trained_tokens": 256 * step,
        "tokens_per_second": 900.0 + 10 * step,
        "eta_seconds": 2.0 * (STEPS - step),
        "aux_loss": 0.01,
        "router_load": [0.3, 0.25, 0.25, 0.2],
        "shared_with": 0,
    }
    if final:
        values["valid_loss"] = 0.58
        values["valid_reward_accuracy"] = 0.8
    return values


def create_dpo_job(
    server: LiveServer, api_key: str, folder: Path, method: dict[str, Any] = DPO_MIXLORA
) -> str:
    """A running DPO job (`method`: the stored JSON, `Method.to_json()`) of `api_key`'s
    tenant, on a training and a validation file of preference pairs; no metrics yet."""
    data = folder / "pairs.jsonl"
    data.write_bytes(PAIR * PAIRS)
    with server.db.transaction() as session:
        tenant = tenants.authenticate(session=session, api_key=api_key)
        assert tenant is not None
        ids = []
        for name, rows in (("pairs.jsonl", PAIRS), ("pairs-valid.jsonl", 8)):
            f = files.create_file(
                session=session,
                file_id=files.new_file_id(),
                tenant_id=tenant.id,
                filename=name,
                purpose="fine-tune",
                size=len(PAIR) * rows,
                rows=rows,
                sha256="0" * 64,
                path=str(data),
            )
            ids.append(f.id)
        job = jobs.create_job(
            session=session,
            tenant_id=tenant.id,
            model=server.settings.base_model,
            training_file_id=ids[0],
            validation_file_id=ids[1],
            method=method,
            seed=7,
        )
        jobs.set_job_status(
            session=session, job_id=job.id, status=JobStatus.RUNNING, message="Job started"
        )
        row = session.get(models.Job, job.id)
        assert row is not None
        row.started_at = datetime.now(UTC)
    return job.id


def add_dpo_step(server: LiveServer, job_id: str, step: int) -> dict[str, Any]:
    """Write step `step`'s metrics and publish them on the app's bus, as the worker does
    (so an open SSE stream gets them at once); returns the values."""
    values = dpo_values(step, final=step == STEPS)
    with server.db.transaction() as session:
        record = jobs.add_metrics(session=session, job_id=job_id, step=step, values=values)
    server.app.state.ctx.bus.publish(job_id, record.to_message())
    return values


def finish_job(server: LiveServer, job_id: str) -> None:
    """Mark the job succeeded and publish its status event (an open stream then ends)."""
    with server.db.transaction() as session:
        after = jobs.get_job(session=session, job_id=job_id).last_seq
        jobs.set_job_status(
            session=session, job_id=job_id, status=JobStatus.SUCCEEDED, message="Job succeeded"
        )
    with server.db.transaction() as session:
        for record in jobs.progress_since(session=session, job_id=job_id, after_seq=after):
            server.app.state.ctx.bus.publish(job_id, record.to_message())
