"""Builders for trainer tests: synthetic tokenised rows and jobs on tiny models."""

from __future__ import annotations

import random

from mixloom.data.tokenize import IGNORE_INDEX, EncodedRow
from mixloom.jobspec import LoraHyperparameters, MixLoraHyperparameters
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.specs import AdapterSpec
from mixloom.trainer.fused import FusedTrainer
from mixloom.trainer.job import TrainingJob


def synthetic_rows(
    n: int, seed: int, vocab: int = 128, lo: int = 6, hi: int = 20
) -> list[EncodedRow]:
    """Rows of random length whose first part is a prompt (label -100)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(1, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        rows.append(EncodedRow(ids, labels))
    return rows


def make_job(name: str, hp: LoraHyperparameters, *, seed: int = 7, n_rows: int = 12) -> TrainingJob:
    adapter = AdapterSpec.from_hyperparameters(name, hp, seed=seed)
    return TrainingJob(name, adapter, hp, synthetic_rows(n_rows, seed=seed * 31 + 1), seed=seed)


def lora_hp(**kw: object) -> LoraHyperparameters:
    base = dict(
        r=4, lora_alpha=8, lora_dropout=0.1, learning_rate=5e-3, batch_size=4, warmup_ratio=0.0
    )
    base.update(kw)
    return LoraHyperparameters(**base)  # type: ignore[arg-type]


def mixlora_hp(**kw: object) -> MixLoraHyperparameters:
    base = dict(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        learning_rate=5e-3,
        batch_size=4,
        warmup_ratio=0.0,
        num_experts=4,
        top_k=2,
        expert_lora={"r": 2, "lora_alpha": 4},
    )
    base.update(kw)
    return MixLoraHyperparameters(**base)  # type: ignore[arg-type]


def three_kinds(lora_dropout: float = 0.0) -> list[TrainingJob]:
    """A LoRA job, a top-2 MixLoRA job with dropout and a switch MixLoRA job with another
    expert rank, 4 rows each (rows of random length: padded batches)."""
    return [
        make_job("lo", lora_hp(r=4, batch_size=2, lora_dropout=lora_dropout), seed=1, n_rows=4),
        make_job(
            "mx",
            mixlora_hp(num_experts=3, top_k=2, batch_size=2, lora_dropout=0.1),
            seed=2,
            n_rows=4,
        ),
        make_job(
            "sw",
            mixlora_hp(r=8, num_experts=2, routing="switch", batch_size=2, expert_lora={"r": 4}),
            seed=3,
            n_rows=4,
        ),
    ]


def trainer_for(
    model: object, backend: str = "torch", recompute: bool | None = None
) -> FusedTrainer:
    return FusedTrainer(AdapterModel(model, backend=backend, recompute=recompute), pad_id=0)
