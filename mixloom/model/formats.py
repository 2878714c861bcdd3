"""Adapter files: LoRA in the PEFT layout, MixLoRA in the `mixlora` layout, plus
`mixloom_adapter.json` holding the exact spec (so that import restores every setting), the
base model's identities and the prompt rendering the job trained with (`read_metadata`).

PEFT LoRA:  adapter_config.json (peft_type LORA) + adapter_model.safetensors with keys
            base_model.model.model.layers.{L}.{self_attn|mlp}.{proj}.lora_{A,B}.weight
            (+ .lora_magnitude_vector with DoRA).
MixLoRA:    adapter_config.json (peft_type MIXLORA, routing_strategy, act_fn, ...) +
            adapter_model.safetensors with keys
            mixlora.layers.{L}.self_attn.{proj}.lora_{A,B}.weight,
            mixlora.layers.{L}.mlp.moe_gate.weight,
            mixlora.layers.{L}.mlp.{proj}.experts.{e}.lora_{A,B}.weight
            (+ .lora_magnitude_vector with DoRA). The `mixlora` package reads the same
            tensors from adapter_model.bin (torch.save), written on request only
            (`mixloom.interop.write_mixlora_bin`, `GET .../adapter?format=mixlora`): one copy
            of the weights is stored, never two.

`adapter_config.json`'s base_model_name_or_path is the base's public identity (a hub id,
`BaseModel.hub_id`), so that PEFT finds the base on any machine; the folder it was loaded
from here is in mixloom_adapter.json only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mixloom.errors import ConfigError, ModelLoadError
from mixloom.jobspec import Routing
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.specs import AdapterSpec, LoraSpec

SPEC_FILE = "mixloom_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MIXLORA_BIN_FILE = "adapter_model.bin"
# How a job's rows became text (data/tokenize.py): "chat" (the base's chat template) or
# "plain" (prompt + completion + EOS, raw text); inference and evaluation render alike
RENDERINGS = ("chat", "plain")
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


_SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(AdapterSpec))


def spec_from_json(data: dict[str, Any]) -> AdapterSpec:
    data = {k: v for k, v in data.items() if k in _SPEC_FIELDS}
    data["lora"] = LoraSpec(**data["lora"])
    data["expert"] = LoraSpec(**data["expert"])
    data["targets"] = tuple(data["targets"])
    return AdapterSpec(**data)


def _act_name(model: AdapterModel) -> str:
    cfg = model.config
    return getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", "silu")


def save_adapter(
    model: AdapterModel,
    name: str,
    out_dir: str | Path,
    base_name: str,
    *,
    base_path: str | None = None,
    rendering: str = "chat",
) -> Path:
    """Write one adapter's files into out_dir; each file lands whole (temp file + rename),
    and other files in out_dir (metrics, checkpoints) are left alone.

    `base_name`: the base's public identity (adapter_config.json's base_model_name_or_path);
    `base_path`: where this machine loaded it from (mixloom_adapter.json only); `rendering`:
    how the job's rows were rendered (RENDERINGS)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = model.specs[name]
    tensors = export_tensors(model, name)
    cfg = adapter_config(spec, base_name, _act_name(model))
    meta = {
        **spec_to_json(spec),
        "base_model": {"name_or_path": base_name, "path": base_path or base_name},
        "rendering": rendering,
    }

    def put(fname: str, write: Any) -> None:
        tmp = out / f".{fname}.tmp{os.getpid()}"
        write(tmp)
        os.replace(tmp, out / fname)

    put(WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    (out / MIXLORA_BIN_FILE).unlink(missing_ok=True)  # an older export's second copy
    put(SPEC_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))
    put("adapter_config.json", lambda p: p.write_text(json.dumps(cfg, indent=2)))
    return out


@dataclasses.dataclass(frozen=True)
class AdapterMetadata:
    """What mixloom knows of a saved adapter beyond its weights (`read_metadata`)."""

    spec: AdapterSpec
    base_model_name_or_path: str  # the base's public identity (adapter_config.json's)
    base_model_path: str | None  # where the base was loaded from where it trained
    rendering: str  # "chat" | "plain": how its rows became text (RENDERINGS)


def read_metadata(adapter_dir: str | Path) -> AdapterMetadata:
    """The adapter's spec, its base model's identity and path, and its rendering. An
    adapter that mixloom did not write (or wrote before these were recorded) has no path and
    the chat rendering."""
    folder = Path(adapter_dir)
    spec, cfg = read_spec(folder)
    meta: dict[str, Any] = {}
    if (folder / SPEC_FILE).exists():
        meta = json.loads((folder / SPEC_FILE).read_text())
    base = meta.get("base_model") or {}
    name = str(base.get("name_or_path") or cfg.get("base_model_name_or_path") or "")
    rendering = meta.get("rendering", "chat")
    return AdapterMetadata(
        spec=spec,
        base_model_name_or_path=name,
        base_model_path=base.get("path"),
        rendering=rendering if rendering in RENDERINGS else "chat",
    )


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model to load an adapter on, as mixloom's loaders take it: the folder it was
    trained on when this machine has it, else its public identity (the embedded default's
    hub id loads the embedded copy when the Hugging Face cache lacks it: base.py)."""
    meta = read_metadata(adapter_dir)
    path = meta.base_model_path
    if path and (Path(path) / "config.json").is_file():
        return path
    if not meta.base_model_name_or_path:
        raise ModelLoadError(
            f"{adapter_dir}: adapter_config.json names no base_model_name_or_path; give the "
            "base model (a Hugging Face folder or hub id) explicitly"
        )
    return meta.base_model_name_or_path


def adapter_folder(given: str, tmp: Path, *, param: str = "--adapter") -> Path:
    """An adapter's folder: `given` as it is, or a downloaded .zip unpacked into `tmp`.
    ConfigError (naming `param`) for anything else."""
    path = Path(given)
    if not path.exists():
        raise ConfigError(
            f"{param} {given}: no such file or folder; give an adapter folder or the .zip "
            "that `mixloom adapters download` wrote"
        )
    if path.is_dir():
        return path
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{param} {given}: neither a folder nor a zip archive")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if any(n.startswith("/") or ".." in Path(n).parts for n in names):
            raise ConfigError(f"{param} {given}: the archive names paths outside its folder")
        zf.extractall(tmp)
    config = next(iter(sorted(tmp.rglob("adapter_config.json"))), None)
    if config is None:
        raise ConfigError(f"{param} {given}: the archive holds no adapter_config.json")
    return config.parent


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
    if (folder / WEIGHTS_FILE).exists():
        return load_file(str(folder / WEIGHTS_FILE))
    if (folder / MIXLORA_BIN_FILE).exists():
        return torch.load(folder / MIXLORA_BIN_FILE, map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{folder} holds no {WEIGHTS_FILE} or {MIXLORA_BIN_FILE}")


def adapter_state_from_files(
    model: AdapterModel, name: str, adapter_dir: str | Path, spec: AdapterSpec | None = None
) -> dict[str, Tensor]:
    """The weights stored in adapter_dir, named as `model.adapter_state_dict(name)` names
    them (the adapter `name` must be in `model` with the folder's spec): a checkpoint's
    trainer state keeps no second copy of them."""
    spec = spec or model.specs[name]
    tensors = read_tensors(adapter_dir)
    state: dict[str, Tensor] = {}
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
    return state


def load_adapter_into(
    model: AdapterModel, adapter_dir: str | Path, name: str, *, pack_group: str = ""
) -> AdapterSpec:
    """Add the adapter stored in adapter_dir to `model` under `name`, with its weights
    (`pack_group`: AdapterModel.add_adapter's)."""
    spec, _ = read_spec(adapter_dir, name)
    model.add_adapter(spec, pack_group=pack_group)
    try:
        model.load_adapter_state_dict(name, adapter_state_from_files(model, name, adapter_dir))
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

    `base_model` is a model id/folder (as in `mixloom train`), a loaded HF model, a mixloom
    BaseModel, or None: the base the adapter names (`adapter_base`: the folder it trained
    on when this machine has it, else its hub id). Dropout is off and routing is
    deterministic (eval mode).
    """
    from mixloom.model.base import BaseModel, load_base_model

    if base_model is None:
        base_model = adapter_base(adapter_dir)
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
