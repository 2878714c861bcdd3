"""End to end through HTTP on real Postgres and Redis: jobs submitted to the API train
together in fused steps on a worker and come back as adapters that PEFT and `mixlora` load,
equal to the same jobs trained with `mixloom train`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
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

COMMON = dict(warmup_ratio=0.0, lora_dropout=0.1, max_seq_len=32)
JOBS: list[dict[str, Any]] = [
    {
        "name": "lora",
        "seed": 11,
        "method": {
            "type": "lora",
            "lora": {
                "hyperparameters": {
                    **COMMON,
                    "r": 4,
                    "lora_alpha": 8,
                    "learning_rate": 5e-3,
                    "batch_size": 4,
                    "n_epochs": 2,
                    "target_modules": ["q_proj", "v_proj", "down_proj"],
                }
            },
        },
    },
    {
        "name": "moe",
        "seed": 12,
        "method": {
            "type": "mixlora",
            "mixlora": {
                "hyperparameters": {
                    **COMMON,
                    "r": 4,
                    "lora_alpha": 8,
                    "learning_rate": 3e-3,
                    "batch_size": 6,
                    "micro_batch_size": 3,
                    "num_experts": 4,
                    "top_k": 2,
                    "lr_scheduler": "cosine",
                }
            },
        },
    },
    {
        "name": "dyn",
        "seed": 13,
        "method": {
            "type": "mixlora",
            "mixlora": {
                "hyperparameters": {
                    **COMMON,
                    "r": 2,
                    "lora_alpha": 4,
                    "learning_rate": 1e-2,
                    "batch_size": 3,
                    "num_experts": 3,
                    "routing": "top_p",
                    "top_p": 0.7,
                    "checkpoint_every": 3,
                }
            },
        },
    },
]


def _submit(client: Any, file_id: str, model: str, spec: dict[str, Any], **kw: Any) -> Any:
    return client.create_job(
        training_file=file_id,
        model=model,
        method=spec["method"],
        seed=spec["seed"],
        suffix=spec["name"],
        **kw,
    )


def test_three_jobs_train_fused_and_match_mixloom_train(
    tmp_path: Path, tiny_base: Path, pg_url: str, redis: str
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24))
    val = write_jsonl(tmp_path / "val.jsonl", arithmetic_rows(6, seed=1))
    with stack(tmp_path, tiny_base, database_url=pg_url, redis_url=redis) as s:
        client = s.client("acme")
        f = client.upload_file(data)
        v = client.upload_file(val)
        model = client.list_models()[0].id
        submitted = {j["name"]: _submit(client, f.id, model, j, validation_file=v.id) for j in JOBS}
        s.start_worker()
        done = {n: wait_status(client, j.id, "succeeded") for n, j in submitted.items()}

        # they trained in the same fused steps, and the metrics say so
        series = {n: metrics(client, j.id) for n, j in submitted.items()}
        first = {n: m[0].metrics for n, m in series.items()}
        for name, values in first.items():
            assert values["shared_with"] == len(first) - 1, (name, values["shared_with"])
        moe_last = series["moe"][-1].metrics
        assert len(moe_last["router_load"]) == 4 and moe_last["valid_loss"] > 0
        for name, m in series.items():
            assert [x.step for x in m] == list(range(1, len(m) + 1)), name
            assert m[-1].metrics["eta_seconds"] == 0
            assert done[name].trained_tokens == m[-1].metrics["trained_tokens"] > 0
        ckpts = list(client.iter_checkpoints(submitted["dyn"].id))
        assert sorted(c.step_number for c in ckpts) == [3, 6, 8]  # every 3 steps and the last
        events = [e.message for e in client.iter_events(submitted["moe"].id)]
        assert any("Job succeeded" in e for e in events)
        assert any("Training on a worker" in e for e in events)

        # download: zips with files at their root, equal to `mixloom train`'s adapters
        reference = train_reference(tmp_path, tiny_base, data, JOBS)
        folders = {}
        for name, job in submitted.items():
            archive = client.download_adapter(job.id, tmp_path / f"{name}.zip")
            folders[name] = tmp_path / f"unzipped-{name}"
            assert_same_tensors(adapter_tensors(archive, folders[name]), reference[name])
        step3 = next(c for c in ckpts if c.step_number == 3)
        part = client.download_adapter(submitted["dyn"].id, tmp_path, checkpoint_id=step3.id)
        adapter_tensors(part, tmp_path / "dyn-step3")
        # the `mixlora` package reads adapter_model.bin: the download made for it
        for_mixlora = client.download_adapter(
            submitted["moe"].id, tmp_path / "moe-mixlora", format="mixlora", extract=True
        )

    _load_in_peft(tiny_base, folders["lora"])
    _load_in_mixlora(for_mixlora)


def _load_in_peft(base: Path, folder: Path) -> None:
    import torch.distributed.tensor  # noqa: F401  (peft touches it without importing it)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert loaded and any(float(v.abs().sum()) > 0 for v in loaded.values())


def _load_in_mixlora(folder: Path) -> None:
    from mixlora import MixLoraModelForCausalLM

    model, config = MixLoraModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert config.num_experts_ == 4
    out = model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert torch.isfinite(out.logits).all()
