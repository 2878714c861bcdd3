"""`mixloom jobs watch` and `jobs get` on a DPO job (its metrics written through the
storage layer, live over the stream): each step shows the DPO loss, the reward accuracy and
the margin; a supervised job's lines are as before."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from clients.dpo_jobs import STEPS, add_dpo_step, create_dpo_job, dpo_values, finish_job
from live_server import TRAIN_ROWS, LiveServer, ScriptedWorker

from mixloom.clients import Client
from mixloom.clients.cli import _postfix
from mixloom.clients.types import Metric


def _metric(step: int, values: dict[str, Any]) -> Metric:
    return Metric.from_json({"step": step, "created_at": 0, "metrics": values})


def test_postfix_of_a_dpo_step_and_of_a_supervised_one() -> None:
    assert _postfix(_metric(3, dpo_values(3))) == {
        "loss": "0.5936",  # -log sigmoid(0.21)
        "acc": "0.62",
        "margin": "0.21",
        "tok/s": "930",
    }
    assert _postfix(_metric(STEPS, dpo_values(STEPS, final=True))) == {
        "loss": "0.5050",
        "acc": "0.88",
        "margin": "0.42",
        "valid_loss": "0.5800",
        "valid_acc": "0.80",
        "tok/s": "960",
    }
    supervised = {"train_loss": 1.25, "valid_loss": 1.5, "tokens_per_second": 812.4}
    assert _postfix(_metric(2, supervised)) == {
        "loss": "1.2500",
        "valid_loss": "1.5000",
        "tok/s": "812",
    }


def test_watch_shows_reward_accuracy_and_margin_live(
    cli: Any, server: LiveServer, api_key: str, tmp_path: Path
) -> None:
    job_id = create_dpo_job(server, api_key, tmp_path)
    for step in (1, 2, 3):
        add_dpo_step(server, job_id, step)

    def train_on() -> None:  # the rest arrive while `jobs watch` follows the stream
        for step in range(4, STEPS + 1):
            time.sleep(0.2)
            add_dpo_step(server, job_id, step)
        finish_job(server, job_id)

    trainer = threading.Thread(target=train_on, daemon=True)
    trainer.start()
    try:
        code, out, err = cli("jobs", "watch", job_id)
    finally:
        trainer.join(timeout=30)
    assert code == 0 and f"{job_id} succeeded" in out
    assert f"{STEPS}/{STEPS}" in err
    for step, shown in ((1, "acc=0.50, margin=0.07"), (3, "acc=0.62, margin=0.21")):
        loss = f"loss={dpo_values(step)['train_loss']:.4f}"
        assert f"{loss}, {shown}" in err, (step, err)
    assert "loss=0.5050, acc=0.88, margin=0.42, valid_loss=0.5800, valid_acc=0.80" in err

    code, out, _ = cli("jobs", "get", job_id)
    assert code == 0 and "dpo/mixlora" in out
    assert "  loss 0.5050\n  reward acc 0.88, margin 0.42\n" in out


def test_watch_of_a_supervised_job_has_no_dpo_columns(
    cli: Any, server: LiveServer, api_key: str
) -> None:
    client = Client(server.url, api_key, max_retries=0)
    job = client.create_job(training_file=client.upload_file(TRAIN_ROWS).id)
    assert ScriptedWorker(server, steps=4, tick=0.01).run_job(job.id) == "succeeded"
    code, _, err = cli("jobs", "watch", job.id)
    assert code == 0 and "loss=" in err and "4/4" in err
    assert "acc=" not in err and "margin=" not in err
    code, out, _ = cli("jobs", "get", job.id)
    assert "\n  loss " in out and "reward" not in out
