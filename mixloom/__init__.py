"""mixloom: many tenants' LoRA and MixLoRA adapters trained together on one frozen base model."""

from typing import Any

__version__ = "0.1.0"


def load_adapter_model(base_model: Any, adapter_dir: Any, **kwargs: Any) -> Any:
    """Load a base model with a trained adapter (LoRA or MixLoRA) applied.

    Imported lazily so that the API process never pulls in torch.
    """
    from mixloom.model.formats import load_adapter_model as _load

    return _load(base_model, adapter_dir, **kwargs)


__all__ = ["__version__", "load_adapter_model"]
