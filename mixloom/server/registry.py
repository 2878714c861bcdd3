"""The base models this deployment serves, without loading them (no torch here)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mixloom.config import Settings

DEFAULT_MODEL_ID = "smollm2-135m"


@dataclass(frozen=True)
class ServedModel:
    id: str
    max_position_embeddings: int  # a job's max_seq_len may not exceed it
    description: str = ""


KNOWN_MODELS = {
    DEFAULT_MODEL_ID: ServedModel(
        DEFAULT_MODEL_ID, 8192, "SmolLM2-135M-Instruct, the embedded default (offline)"
    ),
}


def served_models(settings: Settings) -> list[ServedModel]:
    """MIXLOOM_BASE_MODEL: a known id, or a local model directory with a config.json."""
    name = settings.base_model
    if name in KNOWN_MODELS:
        return [KNOWN_MODELS[name]]
    context = _context_from_config(Path(name) / "config.json")
    return [ServedModel(name, context or settings.max_seq_len, "configured base model")]


def _context_from_config(path: Path) -> int | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None
