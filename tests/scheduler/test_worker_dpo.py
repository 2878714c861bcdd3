"""DPO jobs through HTTP: a worker trains a supervised job, a DPO LoRA job and a DPO MixLoRA
job of different tenants in the same fused steps, each adapter equal to what `mixloom train`
gives the same specs; the DPO jobs report TRL's reward metrics; a pair whose answer does not
fit in max_seq_len fails its job with the line named, the others unharmed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers import (
    adapter_tensors,
    arithmetic_rows,
    assert_same_tensors,
    metrics,
    stack,
    train_reference,
    wait_status,
    write_jsonl,
)

from mixloom.jobspec import method_body

HP = dict(r=4, lora_alpha=8, learning_rate=3e-3, warmup_ratio=0.0, max_seq_len=48, batch_size=4)


def preference_rows(n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        a, b = i % 5, i // 5
        rows.append(
            {
                "input": {"messages": [{"role": "user", "content": f"What is {a}+{b}?"}]},
                "preferred_output": [{"role": "assistant", "content": f"{a + b}."}],
                "non_preferred_output": [{"role": "assistant", "content": f"{a * b + 7}, I think"}],
            }
        )
    return rows


def _dpo(adapter: str, **extra: Any) -> dict[str, Any]:
    hp: dict[str, Any] = {**HP, "beta": 0.2, **extra}
    if adapter == "mixlora":
        hp.update(num_experts=3, top_k=2)
    return method_body("dpo", adapter, hp)  # type: ignore[arg-type]


def test_supervised_and_dpo_jobs_share_steps_and_each_trains_as_mixloom_train_does(
    tmp_path: Path, tiny_base: Path
) -> None:
    sft_data = write_jsonl(tmp_path / "sft.jsonl", arithmetic_rows(12, seed=4))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(12))
    held_out = write_jsonl(tmp_path / "held.jsonl", preference_rows(16)[12:])
    specs = [
        {"name": "sft", "seed": 1, "method": {"type": "lora", "lora": {"hyperparameters": HP}}},
        {"name": "dpo-lora", "seed": 2, "method": _dpo("lora")},
        {"name": "dpo-mix", "seed": 3, "method": _dpo("mixlora", label_smoothing=0.1)},
    ]
    files = {"sft": sft_data, "dpo-lora": pairs, "dpo-mix": pairs}
    with stack(tmp_path, tiny_base) as s:
        ids = {}
        for i, spec in enumerate(specs):
            client = s.client(f"tenant-{i}")
            training = client.upload_file(files[spec["name"]]).id
            validation = client.upload_file(held_out).id if spec["name"] != "sft" else None
            job = client.create_job(
                training_file=training,
                validation_file=validation,
                method=spec["method"],
                seed=spec["seed"],
            )
            assert job.raw["method"]["type"] == spec["method"]["type"]
            ids[spec["name"]] = (client, job.id)
        s.start_worker()
        done = {name: wait_status(c, job_id, "succeeded") for name, (c, job_id) in ids.items()}
        got = {
            name: adapter_tensors(
                c.download_adapter(job_id, tmp_path / f"{name}.zip"), tmp_path / name
            )
            for name, (c, job_id) in ids.items()
        }
        rows = {name: metrics(c, job_id) for name, (c, job_id) in ids.items()}
    assert any(m.metrics.get("shared_with", 0) >= 2 for m in rows["dpo-lora"])  # fused
    for name in ("dpo-lora", "dpo-mix"):
        assert done[name].raw["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
        last = rows[name][-1].metrics
        for key in ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"):
            assert isinstance(last[key], float), (name, key, last)
        assert 0.0 <= last["reward_accuracy"] <= 1.0
        assert 0.0 <= last["valid_reward_accuracy"] <= 1.0 and "valid_loss" in last
    assert "reward_accuracy" not in rows["sft"][-1].metrics
    reference = train_reference(
        tmp_path,
        tiny_base,
        sft_data,
        [{**spec, "training_file": str(files[spec["name"]])} for spec in specs],
    )
    for name in got:
        assert_same_tensors(got[name], reference[name])


def test_a_pair_too_long_for_max_seq_len_fails_its_job_naming_the_line(
    tmp_path: Path, tiny_base: Path
) -> None:
    rows = preference_rows(6)
    rows[4]["preferred_output"][0]["content"] = "a long answer " * 8  # past max_seq_len 48
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    good = write_jsonl(tmp_path / "good.jsonl", preference_rows(6))
    with stack(tmp_path, tiny_base) as s:
        client = s.client("long")
        bad = client.create_job(
            training_file=client.upload_file(pairs).id, method=_dpo("lora"), seed=1
        )
        fine = client.create_job(
            training_file=client.upload_file(good).id, method=_dpo("lora"), seed=1
        )
        s.start_worker()
        failed = wait_status(client, bad.id, "failed")
        wait_status(client, fine.id, "succeeded")
    error = failed.raw["error"]
    assert error["code"] == "invalid_training_data"
    assert ":5: preferred_output" in error["message"], error
    assert "max_seq_len=48" in error["message"]
    assert json.dumps(error)  # a plain JSON error, as the API shows it
