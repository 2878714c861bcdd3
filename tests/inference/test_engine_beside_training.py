"""Inference shares the worker's AdapterModel with training and changes nothing of it: jobs
trained with inference adapters loaded, decoding and evicted between their steps (a request
running across training steps, a job joining after inference adapters came) end with the
same weights and optimizer state, bit for bit, as jobs trained without; and every step leaves
the training adapters' memory and the FusedState as it found them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from infer_helpers import BASE, greedy, prompt
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixloom.data.tokenize import IGNORE_INDEX, EncodedRow
from mixloom.inference import EngineConfig, InferenceEngine, SamplingParams
from mixloom.jobspec import LoraHyperparameters, MixLoraHyperparameters
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.specs import AdapterSpec
from mixloom.trainer.fused import FusedTrainer
from mixloom.trainer.job import TrainingJob


def _rows(n: int, seed: int) -> list[EncodedRow]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(1, 200) for _ in range(rng.randint(6, 16))]
        cut = rng.randint(1, len(ids) - 2)
        rows.append(EncodedRow(ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return rows


def _job(name: str, hp: LoraHyperparameters, seed: int) -> TrainingJob:
    spec = AdapterSpec.from_hyperparameters(name, hp, seed=seed)
    return TrainingJob(name, spec, hp, _rows(8, seed), seed=seed)


def _jobs() -> list[TrainingJob]:
    common: dict[str, Any] = dict(
        learning_rate=5e-3, batch_size=2, warmup_ratio=0.0, lora_dropout=0.1
    )
    return [
        _job("lo", LoraHyperparameters(r=4, lora_alpha=8, **common), seed=1),
        _job(
            "mx",
            MixLoraHyperparameters(
                r=4, lora_alpha=8, num_experts=3, top_k=2, expert_lora={"r": 2}, **common
            ),
            seed=2,
        ),
        _job("late", LoraHyperparameters(r=2, lora_alpha=4, **common), seed=3),
    ]


def _train(base_dir: Path, adapter_dirs: dict[str, Path], with_inference: bool) -> dict[str, Any]:
    model = AdapterModel(AutoModelForCausalLM.from_pretrained(base_dir))
    trainer = FusedTrainer(model, pad_id=0)
    lo, mx, late = _jobs()
    trainer.add_job(lo)
    trainer.add_job(mx)
    engine = InferenceEngine(
        model,
        AutoTokenizer.from_pretrained(base_dir),
        lambda m: None if m == BASE else adapter_dirs[m],
        EngineConfig(max_batch_tokens=16, max_running=8, max_n=4),
    )

    def between_steps(work: list[tuple[str, SamplingParams]], steps: int) -> None:
        """What a worker does between training steps: a few decoding steps."""
        if not with_inference:
            return
        st = model.state
        found = dict(vars(st))
        pointers = {
            k: p.data_ptr() for j in trainer.jobs for k, p in model.named_adapter_parameters(j)
        }
        for i, (model_id, params) in enumerate(work):
            engine.submit(model_id, prompt(60 + i, 20), params)
        for _ in range(steps):
            engine.step()
        assert all(vars(st)[k] is v for k, v in found.items())  # the trainer's router logs too
        assert pointers == {
            k: p.data_ptr() for j in trainer.jobs for k, p in model.named_adapter_parameters(j)
        }

    trainer.step()
    between_steps([("lora-a", greedy(30)), ("moe-c", SamplingParams(max_tokens=30, seed=1))], 4)
    trainer.step()  # two requests still decoding
    between_steps([("moe-d", greedy(5)), (BASE, greedy(5))], 3)
    trainer.add_job(late)  # joins while inference adapters are loaded
    trainer.step()
    between_steps([("lora-b", greedy(4))], 40)  # everything finishes
    if with_inference:
        assert not engine.has_work
        engine.release_memory()  # evicts every inference adapter
        assert set(model.specs) == {"lo", "mx", "late"}
    trainer.step()
    trainer.step()
    return {
        name: (model.adapter_state_dict(name), job.optimizer.state_dict())
        for name, job in trainer.jobs.items()
    }


def test_training_is_bit_identical_with_inference_between_its_steps(
    base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    plain = _train(base_dir, adapter_dirs, with_inference=False)
    beside = _train(base_dir, adapter_dirs, with_inference=True)
    assert plain.keys() == beside.keys() == {"lo", "mx", "late"}
    for name in plain:
        weights, optimizer = plain[name]
        weights2, optimizer2 = beside[name]
        for k in weights:
            assert torch.equal(weights[k], weights2[k]), (name, k)
        for i, state in optimizer["state"].items():
            for k, v in state.items():
                assert torch.equal(v, optimizer2["state"][i][k]), (name, i, k)
