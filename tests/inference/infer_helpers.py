"""Builders for the inference tests: a tiny base saved as a folder (with the byte-level
tokenizer), adapters exported from it with trained-like weights, engines over fresh copies."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixloom.inference import EngineConfig, InferenceEngine, SamplingParams
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.formats import save_adapter
from mixloom.model.specs import AdapterSpec, LoraSpec

BASE = "tiny-base"  # the base's model id in these tests

# Two LoRAs and two MixLoRAs of different ranks, targets and expert counts. The MixLoRAs
# keep what `mixlora` 0.2.3 can load: top-k routing, experts with the attention LoRA's
# settings, integral alpha, dropout > 0 (tests/model/test_formats.py).
SPECS = {
    "lora-a": AdapterSpec(
        "lora-a", kind="lora", lora=LoraSpec(r=4, alpha=8), targets=("q_proj", "v_proj", "up_proj")
    ),
    "lora-b": AdapterSpec("lora-b", kind="lora", lora=LoraSpec(r=8, alpha=16, rslora=True)),
    "moe-c": AdapterSpec(
        "moe-c",
        kind="mixlora",
        lora=LoraSpec(r=4, alpha=8),
        expert=LoraSpec(r=4, alpha=8),
        num_experts=4,
        top_k=2,
    ),
    "moe-d": AdapterSpec(
        "moe-d",
        kind="mixlora",
        lora=LoraSpec(r=2, alpha=4),
        expert=LoraSpec(r=2, alpha=4),
        num_experts=6,
        top_k=3,
        targets=("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
}


def trained_like(model: AdapterModel, name: str, seed: int, scale: float = 0.3) -> None:
    """Give every adapter weight a nonzero value, as training would (large enough that each
    adapter changes what the tiny model says)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def export_adapters(base_dir: Path, out: Path, specs: dict[str, AdapterSpec]) -> dict[str, Path]:
    """Each spec exported (mixloom's format) from a model on the saved base."""
    model = AdapterModel(AutoModelForCausalLM.from_pretrained(base_dir))
    folders = {}
    for i, (mid, spec) in enumerate(specs.items()):
        model.add_adapter(spec)
        trained_like(model, spec.name, seed=100 + i)
        folders[mid] = save_adapter(model, spec.name, out / mid, str(base_dir))
    return folders


def make_engine(
    base_dir: Path,
    folders: dict[str, Path],
    config: EngineConfig | None = None,
    backend: str = "torch",
) -> InferenceEngine:
    """An engine on a fresh copy of the saved base; model ids: BASE and the folders' keys
    (any other id is unknown: the loader raises KeyError)."""
    model = AdapterModel(AutoModelForCausalLM.from_pretrained(base_dir), backend=backend)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    def loader(model_id: str) -> Path | None:
        return None if model_id == BASE else folders[model_id]

    cfg = config or EngineConfig(max_batch_tokens=16, max_running=8, max_n=4, kv_cache_tokens=2048)
    return InferenceEngine(model, tokenizer, loader, cfg)


def prompt(seed: int, length: int, vocab: int = 200) -> list[int]:
    """Token ids of ordinary bytes (no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(10, vocab, (length,), generator=g)).tolist()


def run_all(engine: InferenceEngine, limit: int = 500) -> int:
    """Step until idle; the number of steps."""
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
        assert steps < limit, "the engine did not finish"
    return steps


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]
