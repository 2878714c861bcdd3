"""Working with mixloom's adapters in the ecosystem's own loaders.

- `write_mixlora_bin(adapter_dir)`: the `mixlora` package (0.2.3) reads a MixLoRA adapter's
  weights only from `adapter_model.bin`; mixloom stores them once, as safetensors. This
  writes the .bin beside it (the same tensors; `GET .../adapter?format=mixlora` downloads
  the same file from a server).
- `mixlora_eval(model)`: puts a model loaded by `mixlora` in evaluation mode for real. That
  package keeps its experts' LoRA modules in a plain dict, which `model.eval()` does not
  reach, so their dropout stays on: two calls with the same input differ. mixloom's own
  loader (`mixloom.load_adapter_model`) has no such step to take.

    from mixlora import MixLoraModelForCausalLM
    from mixloom.interop import mixlora_eval, write_mixlora_bin

    write_mixlora_bin("adapter/")
    model, config = MixLoraModelForCausalLM.from_pretrained("adapter/")
    mixlora_eval(model)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mixloom.storage.archives import BIN_FILE, WEIGHTS_FILE, write_torch_bin

__all__ = ["mixlora_eval", "write_mixlora_bin"]


def write_mixlora_bin(adapter_dir: str | Path) -> Path:
    """Write `adapter_model.bin` (what torch.save writes for the adapter's tensors) beside the
    adapter's safetensors file, for the `mixlora` package; returns its path."""
    folder = Path(adapter_dir)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: give a folder mixloom saved")
    target = folder / BIN_FILE
    tmp = folder / f".{BIN_FILE}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            for _ in write_torch_bin(weights, out):
                pass
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def mixlora_eval(model: Any) -> Any:
    """`model.eval()` for a model that `mixlora.MixLoraModelForCausalLM.from_pretrained`
    returned, with every expert's LoRA dropout switched off too (that package leaves it on
    in eval mode). Returns the model."""
    model.eval()
    found = False
    for module in model.modules():
        for moe in (getattr(module, "mixlora_moes", None) or {}).values():
            for expert in getattr(moe, "experts_", {}).values():
                dropout = getattr(expert, "dropout_", None)
                if dropout is not None:
                    dropout.eval()
                    found = True
    if not found:
        raise ValueError("no mixlora experts found: give a model the mixlora package loaded")
    return model
