"""Adapter files: LoRA in the PEFT layout, MixLoRA in the `mixlora` layout, plus
`mixloom_adapter.json` holding the exact spec so that import restores every setting.

PEFT LoRA:  adapter_config.json (peft_type LORA) + adapter_model.safetensors with keys
            base_model.model.model.layers.{L}.{self_attn|mlp}.{proj}.lora_{A,B}.weight
            (+ .lora_magnitude_vector with DoRA).
MixLoRA:    adapter_config.json (peft_type MIXLORA, routing_strategy, act_fn, ...) +
            adapter_model.bin (torch.save) and adapter_model.safetensors with keys
            mixlora.layers.{L}.self_attn.{proj}.lora_{A,B}.weight,
            mixlora.layers.{L}.mlp.moe_gate.weight,
            mixlora.layers.{L}.mlp.{proj}.experts.{e}.lora_{A,B}.weight
            (+ .lora_magnitude_vector with DoRA).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mixloom.errors import ModelLoadError
from mixloom.jobspec import Routing
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.specs import AdapterSpec, LoraSpec

SPEC_FILE = "mixloom_adapter.json"
_ROUTING_NAMES = {
    Routing.TOP_K.value: "mixlora",
    Routing.TOP_P.value: "mixlora-dynamic",
    Routing.SWITCH.value: "mixlora-switch",
}
_ROUTING_FROM_NAME = {v: k for k, v in _ROUTING_NAMES.items()}


def _num(x: float) -> float | int:
    """Write integral floats as ints: the `mixlora` loader insists lora_alpha is an int."""
    return int(x) if float(x).is_integer() else x


def _ours_to_file_key(key: str, spec: AdapterSpec) -> list[tuple[str, Any]]:
    """Map one of our parameter names to file key(s) and how to slice the tensor.

    Ours: layers.{L}.self_attn.{p}.lora_A | layers.{L}.mlp.{p}.lora_A (LoRA) |
          layers.{L}.mlp.router | layers.{L}.mlp.experts.{p}.lora_A (E stacked) | .magnitude
    """
    m = re.fullmatch(
        r"layers\.(\d+)\.(self_attn|mlp)\.(?:experts\.)?(\w+)\.(lora_A|lora_B|magnitude)", key
    )
    r = re.fullmatch(r"layers\.(\d+)\.mlp\.router", key)
    if spec.is_mixlora:
        if r:
            return [(f"mixlora.layers.{r.group(1)}.mlp.moe_gate.weight", None)]
        assert m, key
        layer, block, proj, what = m.groups()
        suffix = "lora_magnitude_vector" if what == "magnitude" else f"{what}.weight"
        if block == "self_attn":
            return [(f"mixlora.layers.{layer}.self_attn.{proj}.{suffix}", None)]
        return [
            (f"mixlora.layers.{layer}.mlp.{proj}.experts.{e}.{suffix}", e)
            for e in range(spec.num_experts)
        ]
    assert m, key
    layer, block, proj, what = m.groups()
    suffix = "lora_magnitude_vector" if what == "magnitude" else f"{what}.weight"
    return [(f"base_model.model.model.layers.{layer}.{block}.{proj}.{suffix}", None)]


def export_tensors(model: AdapterModel, name: str) -> dict[str, Tensor]:
    spec = model.specs[name]
    out: dict[str, Tensor] = {}
    for key, p in model.named_adapter_parameters(name):
        t = p.detach().float().cpu()
        for fkey, index in _ours_to_file_key(key, spec):
            out[fkey] = (t if index is None else t[index]).contiguous()
    return out


def adapter_config(spec: AdapterSpec, base_model_name_or_path: str, act_fn: str) -> dict[str, Any]:
    common = {
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "r": spec.lora.r,
        "lora_alpha": _num(spec.lora.alpha),
        "lora_dropout": spec.lora.dropout,
        "target_modules": list(spec.targets),
        "use_rslora": spec.lora.rslora,
        "use_dora": spec.lora.dora,
    }
    if not spec.is_mixlora:
        return {"peft_type": "LORA", "fan_in_fan_out": False, "inference_mode": True, **common}
    return {
        "peft_type": "MIXLORA",
        **common,
        "routing_strategy": _ROUTING_NAMES[spec.routing],
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "top_p": spec.top_p,
        "act_fn": act_fn,
        "router_aux_loss_coef": spec.aux_loss_coef,
        "router_init_range": spec.router_init_range,
        "jitter_noise": spec.jitter_noise,
        "expert_lora": {
            "r": spec.expert.r,
            "lora_alpha": _num(spec.expert.alpha),
            "lora_dropout": spec.expert.dropout,
            "use_rslora": spec.expert.rslora,
            "use_dora": spec.expert.dora,
        },
    }


def spec_to_json(spec: AdapterSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def spec_from_json(data: dict[str, Any]) -> AdapterSpec:
    data = dict(data)
    data["lora"] = LoraSpec(**data["lora"])
    data["expert"] = LoraSpec(**data["expert"])
    data["targets"] = tuple(data["targets"])
    return AdapterSpec(**data)


def _act_name(model: AdapterModel) -> str:
    cfg = model.config
    return getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", "silu")


def save_adapter(model: AdapterModel, name: str, out_dir: str | Path, base_name: str) -> Path:
    """Write one adapter's files into out_dir; each file lands whole (temp file + rename),
    and other files in out_dir (metrics, checkpoints) are left alone."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = model.specs[name]
    tensors = export_tensors(model, name)
    cfg = adapter_config(spec, base_name, _act_name(model))

    def put(fname: str, write: Any) -> None:
        tmp = out / f".{fname}.tmp{os.getpid()}"
        write(tmp)
        os.replace(tmp, out / fname)

    put(
        "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"})
    )
    if spec.is_mixlora:
        put("adapter_model.bin", lambda p: torch.save(tensors, p))
    put(SPEC_FILE, lambda p: p.write_text(json.dumps(spec_to_json(spec), indent=2)))
    put("adapter_config.json", lambda p: p.write_text(json.dumps(cfg, indent=2)))
    return out


def _lora_from(cfg: dict[str, Any], where: Path) -> LoraSpec:
    try:
        return LoraSpec(
            r=int(cfg["r"]),
            alpha=float(cfg["lora_alpha"]),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            rslora=bool(cfg.get("use_rslora", False)),
            dora=bool(cfg.get("use_dora", False)),
        )
    except KeyError as exc:
        raise ModelLoadError(f"{where}: missing {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: r and lora_alpha must be numbers ({exc})") from None


def read_spec(
    adapter_dir: str | Path, name: str | None = None
) -> tuple[AdapterSpec, dict[str, Any]]:
    """The adapter's spec (exact when written by mixloom) and its adapter_config.json."""
    folder = Path(adapter_dir)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise ModelLoadError(f"{folder} holds no adapter_config.json: not an adapter folder")
    cfg = json.loads(cfg_path.read_text())
    if (folder / SPEC_FILE).exists():
        spec = spec_from_json(json.loads((folder / SPEC_FILE).read_text()))
        return (dataclasses.replace(spec, name=name) if name else spec), cfg
    lora = _lora_from(cfg, cfg_path)
    targets = cfg.get("target_modules") or []
    targets = tuple(targets if isinstance(targets, list) else [k for k, v in targets.items() if v])
    kind = cfg.get("peft_type", "LORA").upper()
    if kind == "LORA":
        return AdapterSpec(name=name or "adapter", kind="lora", targets=targets, lora=lora), cfg
    if kind != "MIXLORA":
        raise ModelLoadError(f"{cfg_path}: peft_type {kind!r} is not LORA or MIXLORA")
    expert = _lora_from({**cfg, **cfg.get("expert_lora", {})}, cfg_path)
    strategy = cfg.get("routing_strategy", "mixlora")
    if strategy not in _ROUTING_FROM_NAME:
        raise ModelLoadError(f"{cfg_path}: unknown routing_strategy {strategy!r}")
    spec = AdapterSpec(
        name=name or "adapter",
        kind="mixlora",
        targets=targets,
        lora=lora,
        num_experts=int(cfg.get("num_experts", 8)),
        routing=_ROUTING_FROM_NAME[strategy],
        top_k=int(cfg.get("top_k", 2)),
        top_p=float(cfg.get("top_p", 0.8)),
        aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
        router_init_range=float(cfg.get("router_init_range", 0.02)),
        jitter_noise=float(cfg.get("jitter_noise", 0.0)),
        expert=expert,
    )
    return spec, cfg


def read_tensors(adapter_dir: str | Path) -> dict[str, Tensor]:
    folder = Path(adapter_dir)
    if (folder / "adapter_model.safetensors").exists():
        return load_file(str(folder / "adapter_model.safetensors"))
    if (folder / "adapter_model.bin").exists():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{folder} holds no adapter_model.safetensors or adapter_model.bin")


def load_adapter_into(
    model: AdapterModel, adapter_dir: str | Path, name: str, *, pack_group: str = ""
) -> AdapterSpec:
    """Add the adapter stored in adapter_dir to `model` under `name`, with its weights
    (`pack_group`: AdapterModel.add_adapter's)."""
    spec, _ = read_spec(adapter_dir, name)
    tensors = read_tensors(adapter_dir)
    model.add_adapter(spec, pack_group=pack_group)
    state: dict[str, Tensor] = {}
    try:
        for key, p in model.named_adapter_parameters(name):
            parts = []
            for fkey, _ in _ours_to_file_key(key, spec):
                if fkey not in tensors:
                    raise ModelLoadError(f"{adapter_dir}: missing tensor {fkey!r}")
                parts.append(tensors[fkey])
            t = parts[0] if len(parts) == 1 else torch.stack(parts)
            if t.shape != p.shape:
                raise ModelLoadError(
                    f"{adapter_dir}: tensor for {key} has shape {tuple(t.shape)}, "
                    f"expected {tuple(p.shape)} (does the adapter match this base model?)"
                )
            state[key] = t
        model.load_adapter_state_dict(name, state)
    except ModelLoadError:
        model.remove_adapter(name)
        raise
    return spec


class InferenceModel(nn.Module):
    """A causal LM with one adapter applied to every row: `model(input_ids=...).logits`."""

    def __init__(self, model: AdapterModel, adapter: str) -> None:
        super().__init__()
        self.inner = model
        self.adapter = adapter
        self.eval()

    @property
    def config(self) -> Any:
        return self.inner.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw: Any) -> Any:
        from mixloom.model.batch import Segment

        segs = [Segment(self.adapter, 0, input_ids.shape[0])]
        with self.inner.fused(segs, attention_mask, training=False, collect_router=False):
            return self.inner.model(input_ids=input_ids, attention_mask=attention_mask, **kw)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Greedy (temperature 0) or sampled decoding of one or more equal-length prompts."""
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self.forward(ids).logits[:, -1, :].float()
            if temperature > 0:
                probs = (logits / temperature).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
        return ids


def load_adapter_model(
    base_model: Any,
    adapter_dir: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    backend: str = "torch",
) -> InferenceModel:
    """A causal LM whose `model(input_ids=...).logits` applies the adapter (LoRA or MixLoRA).

    `base_model` is a model id/folder (as in `mixloom train`), a loaded HF model, or a
    mixloom BaseModel. Dropout is off and routing is deterministic (eval mode).
    """
    from mixloom.model.base import BaseModel, load_base_model

    if isinstance(base_model, BaseModel):
        hf = base_model.model
    elif isinstance(base_model, nn.Module):
        hf = base_model
        hf.requires_grad_(False)
    else:
        hf = load_base_model(str(base_model), dtype=dtype, device=device).model
    model = hf if isinstance(hf, AdapterModel) else AdapterModel(hf, backend=backend)
    name = "adapter"
    load_adapter_into(model, adapter_dir, name)
    return InferenceModel(model, name)
