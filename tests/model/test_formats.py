"""Exports load in the ecosystem's loaders with the same logits: MixLoRA in `mixlora`,
LoRA in PEFT; and import restores exactly what was saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_llama
from torch import Tensor, nn

from mixloom.interop import mixlora_eval, write_mixlora_bin
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.formats import (
    SPEC_FILE,
    InferenceModel,
    load_adapter_model,
    read_spec,
    save_adapter,
)
from mixloom.model.specs import AdapterSpec, LoraSpec


def _trained_like(model: AdapterModel, name: str, seed: int) -> None:
    """Give every adapter weight a nonzero value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def base_dir(tmp_path):  # type: ignore[no-untyped-def]
    tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _export(base_dir, tmp_path, spec: AdapterSpec):  # type: ignore[no-untyped-def]
    """The adapter's folder, and the model it was exported from (the truth an export keeps)."""
    model = AdapterModel(tiny_llama())
    model.add_adapter(spec)
    _trained_like(model, spec.name, 3)
    folder = save_adapter(model, spec.name, tmp_path / spec.name, str(base_dir))
    return folder, InferenceModel(model, spec.name)


def _in_mixlora(folder: Path) -> nn.Module:
    """The export loaded by the `mixlora` package (its .bin written as a user would, the
    file GET .../adapter?format=mixlora serves), in eval mode with its dropout off."""
    from mixlora import MixLoraModelForCausalLM

    write_mixlora_bin(folder)
    ref, _ = MixLoraModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    return mixlora_eval(ref)  # type: ignore[no-any-return]


def _as_mixlora_reads_it(folder: Path, out: Path) -> Path:
    """A copy of a MixLoRA export changed into what `mixlora` 0.2.3 runs: every expert with
    the attention LoRA's settings (it never reads `expert_lora`), and no DoRA (it ignores
    lora_magnitude_vector and makes each magnitude ||W + s*B@A||: a scale of 1)."""
    shutil.copytree(folder, out)
    spec = json.loads((out / SPEC_FILE).read_text())
    spec["lora"]["dora"] = False
    spec["expert"] = dict(spec["lora"])
    (out / SPEC_FILE).write_text(json.dumps(spec))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    kept = {k: v for k, v in tensors.items() if not k.endswith("lora_magnitude_vector")}
    save_file(kept, str(out / "adapter_model.safetensors"))
    return out


# (attention LoRA, expert LoRA) settings
VARIANTS = {
    "lora": ({}, {}),
    "rslora": ({"rslora": True}, {"rslora": True}),
    "dora": ({"dora": True}, {"dora": True}),
    "expert_rslora": ({}, {"rslora": True}),
    "expert_dora": ({}, {"dora": True}),
    "expert_alpha": ({}, {"alpha": 4}),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("routing", ["top_k", "top_p", "switch"])
def test_mixlora_export_in_the_mixlora_package(base_dir, tmp_path, routing, variant) -> None:  # type: ignore[no-untyped-def]
    """What `mixlora` 0.2.3 makes of each export (the README says the same): top-p and
    switch are refused (it implements only the "mixlora", top-k, routing strategy); a top-k
    export gives our logits exactly when its experts share the attention LoRA's settings and
    nothing uses DoRA, and otherwise those of `_as_mixlora_reads_it`."""
    from transformers import AutoModelForCausalLM

    attention, expert = VARIANTS[variant]
    spec = AdapterSpec(
        name="moe",
        kind="mixlora",
        lora=LoraSpec(**{"r": 4, "alpha": 8, **attention}),
        expert=LoraSpec(**{"r": 4, "alpha": 8, **expert}),
        num_experts=4,
        routing=routing,
        top_k=2,
        top_p=0.6,
    )
    folder, trained = _export(base_dir, tmp_path, spec)
    stored = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= stored
    assert "adapter_model.bin" not in stored  # the weights are stored once
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))

    def logits(model: nn.Module) -> Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits  # type: ignore[no-any-return]

    def ours(adapter: Path) -> Tensor:
        return logits(load_adapter_model(AutoModelForCausalLM.from_pretrained(base_dir), adapter))

    mine = ours(folder)
    base = logits(AutoModelForCausalLM.from_pretrained(base_dir))
    assert (mine - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(mine, logits(trained), atol=1e-5, rtol=1e-5)  # nothing lost
    if routing != "top_k":
        with pytest.raises(AssertionError, match="only supports .* 'mixlora' routing_strategy"):
            _in_mixlora(folder)
        return
    ref = logits(_in_mixlora(folder))
    if variant in ("lora", "rslora"):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
        return
    torch.testing.assert_close(
        ref, ours(_as_mixlora_reads_it(folder, tmp_path / "as-read")), atol=1e-5, rtol=1e-5
    )
    assert (mine - ref).abs().max() > 1e-3  # so this export does not load equal


def test_mixlora_eval_switches_off_the_packages_expert_dropout(base_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`model.eval()` leaves the `mixlora` package's expert dropout on (two calls differ);
    `mixloom.interop.mixlora_eval` (the README's fix) makes them equal, and equal to ours."""
    from mixlora import MixLoraModelForCausalLM
    from transformers import AutoModelForCausalLM

    lora = LoraSpec(r=4, alpha=8, dropout=0.3)
    spec = AdapterSpec(name="moe", kind="mixlora", lora=lora, expert=lora, num_experts=4)
    folder, _ = _export(base_dir, tmp_path, spec)
    bin_path = write_mixlora_bin(folder)
    tensors = torch.load(bin_path, weights_only=True)
    stored = load_file(str(folder / "adapter_model.safetensors"))
    assert tensors.keys() == stored.keys()
    for k, v in tensors.items():
        assert torch.equal(v, stored[k])
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()  # its bytes only
    ref, _ = MixLoraModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    with torch.no_grad():
        ref.eval()
        assert not torch.equal(ref(input_ids=ids).logits, ref(input_ids=ids).logits)
        assert mixlora_eval(ref) is ref
        once, twice = ref(input_ids=ids).logits, ref(input_ids=ids).logits
        ours = load_adapter_model(AutoModelForCausalLM.from_pretrained(base_dir), folder)
        mine = ours(input_ids=ids).logits
    assert torch.equal(once, twice)
    torch.testing.assert_close(once, mine, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("attention", "expert", "error"),
    [
        (LoraSpec(r=4, alpha=8, dropout=0.0), None, AssertionError),  # lora_dropout > 0
        (LoraSpec(r=4, alpha=5.5), None, AssertionError),  # lora_alpha must be an int
        (LoraSpec(r=4, alpha=8), LoraSpec(r=2, alpha=8), RuntimeError),  # experts read as r 4
    ],
)
def test_mixlora_package_refuses(base_dir, tmp_path, attention, expert, error) -> None:  # type: ignore[no-untyped-def]
    """Exports that mixloom loads and `mixlora` 0.2.3 cannot (the README says so)."""
    spec = AdapterSpec(
        name="moe", kind="mixlora", lora=attention, expert=expert or attention, num_experts=4
    )
    folder, _ = _export(base_dir, tmp_path, spec)
    with pytest.raises(error):
        _in_mixlora(folder)
    load_adapter_model(tiny_llama(), folder)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_export_loads_in_peft_with_equal_logits(base_dir, tmp_path, dora: bool) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = AdapterSpec(
        name="lo",
        kind="lora",
        lora=LoraSpec(r=4, alpha=8, dora=dora, rslora=not dora),
        targets=("q_proj", "v_proj", "up_proj", "down_proj"),
    )
    folder, trained = _export(base_dir, tmp_path, spec)
    ours = load_adapter_model(AutoModelForCausalLM.from_pretrained(base_dir), folder)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(folder))
    peft.eval()
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, peft(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=ids).logits
        truth = trained(input_ids=ids).logits
    assert (a - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, truth, atol=1e-5, rtol=1e-5)  # the file lost nothing


@pytest.mark.parametrize("routing", ["top_k", "top_p", "switch"])
def test_import_restores_spec_and_weights(base_dir, tmp_path, routing: str) -> None:  # type: ignore[no-untyped-def]
    spec = AdapterSpec(
        name="x",
        kind="mixlora",
        lora=LoraSpec(r=2),
        expert=LoraSpec(r=3, alpha=5.5, dora=True),
        num_experts=3,
        routing=routing,
        top_p=0.6,
        targets=("k_proj", "gate_proj", "down_proj"),
    )
    model = AdapterModel(tiny_llama())
    model.add_adapter(spec)
    _trained_like(model, "x", 4)
    folder = save_adapter(model, "x", tmp_path / "x", str(base_dir))
    loaded, cfg = read_spec(folder, "x")
    assert loaded == spec
    assert cfg["act_fn"] == "silu" and cfg["peft_type"] == "MIXLORA"
    assert (
        cfg["routing_strategy"]
        == {"top_k": "mixlora", "top_p": "mixlora-dynamic", "switch": "mixlora-switch"}[routing]
    )
    again = load_adapter_model(tiny_llama(), folder)
    saved = model.adapter_state_dict("x")
    restored = again.inner.adapter_state_dict("adapter")
    assert saved.keys() == restored.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], restored[k], atol=0, rtol=0)


def test_loader_errors_say_what_is_wrong(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mixloom.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        load_adapter_model(tiny_llama(), tmp_path)
    spec = AdapterSpec(name="w", kind="lora", lora=LoraSpec(r=4))
    model = AdapterModel(tiny_llama())
    model.add_adapter(spec)
    folder = save_adapter(model, "w", tmp_path / "w", "base")
    with pytest.raises(ModelLoadError, match="expected"):  # a different base shape
        load_adapter_model(tiny_llama(hidden_size=32, intermediate_size=48), folder)


def test_foreign_config_missing_keys_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mixloom.errors import ModelLoadError

    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "lora_alpha": 8})
    )
    with pytest.raises(ModelLoadError, match="missing 'r'"):
        read_spec(tmp_path)
