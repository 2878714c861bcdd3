"""Adapters served by the engine: loaded on first use from the folder a loader callback names,
kept up to a byte budget, the least recently used unused one evicted first.

Inference adapters live in the shared AdapterModel under names of their own (`PREFIX` and a
counter, never reused) and in a packing group of their own (`PACK_GROUP`): loading or
evicting one never moves a training job's weights (AdapterModel.add_adapter).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mixloom.errors import ModelLoadError
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.formats import load_adapter_into, read_spec
from mixloom.model.specs import AdapterSpec

PREFIX = "infer:"  # training jobs' adapters are named by job; these cannot be a job's name
PACK_GROUP = "inference"

# model id -> the adapter's folder (mixloom's export), or None when the id names the base
Loader = Callable[[str], "str | Path | None"]


class NoRoom(Exception):
    """The adapter does not fit beside those in use now."""


@dataclass
class _Entry:
    name: str  # in the AdapterModel
    bytes: int
    users: int = 0  # running requests


class AdapterCache:
    """Model id -> loaded adapter, LRU within `budget` bytes of adapter weights."""

    def __init__(self, model: AdapterModel, loader: Loader, budget: int) -> None:
        self.model = model
        self.loader = loader
        self.budget = budget
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._names = (f"{PREFIX}{i}" for i in itertools.count())
        self._bases: set[str] = set()  # ids the loader said name the base

    @property
    def loaded(self) -> dict[str, str]:
        """Model id -> adapter name in the model, least recently used first."""
        return {mid: e.name for mid, e in self._entries.items()}

    @property
    def used_bytes(self) -> int:
        return sum(e.bytes for e in self._entries.values())

    def acquire(self, model_id: str) -> str | None:
        """The model's adapter name in the AdapterModel (None: the id names the base), loading
        it on first use (evicting unused adapters to make room), with one more user.
        Raises NoRoom when it does not fit now beside the adapters that running requests
        hold (try again when one finishes); ModelLoadError when the folder holds no loadable
        adapter or the adapter alone exceeds the budget; whatever the loader raises."""
        if model_id in self._bases:
            return None
        entry = self._entries.get(model_id)
        if entry is None:
            folder = self.loader(model_id)
            if folder is None:
                self._bases.add(model_id)
                return None
            spec, _ = read_spec(folder)
            size = adapter_bytes(self.model, spec)
            if size > self.budget:
                raise ModelLoadError(
                    f"adapter {model_id!r} needs {size} bytes, more than the engine's "
                    f"adapter_cache_bytes ({self.budget}); raise that setting"
                )
            if not self._make_room(size):
                raise NoRoom(model_id)
            name = next(self._names)
            with torch.no_grad():
                load_adapter_into(self.model, folder, name, pack_group=PACK_GROUP)
            for p in self.model.adapter_parameters(name):
                p.requires_grad_(False)  # served, never trained
            entry = self._entries[model_id] = _Entry(name, size)
        self._entries.move_to_end(model_id)
        entry.users += 1
        return entry.name

    def release(self, model_id: str) -> None:
        """One user fewer (the adapter stays loaded until evicted)."""
        if model_id not in self._bases:
            self._entries[model_id].users -= 1

    def evict(self, model_id: str) -> None:
        """Unload an adapter no running request uses."""
        entry = self._entries[model_id]
        if entry.users:
            raise RuntimeError(f"adapter {model_id!r} is in use by {entry.users} request(s)")
        del self._entries[model_id]
        self.model.remove_adapter(entry.name)

    def clear(self) -> None:
        """Unload every unused adapter."""
        for model_id in [m for m, e in self._entries.items() if not e.users]:
            self.evict(model_id)

    def _make_room(self, size: int) -> bool:
        for model_id in [m for m, e in self._entries.items() if not e.users]:
            if self.used_bytes + size <= self.budget:
                break
            self.evict(model_id)
        return self.used_bytes + size <= self.budget


def adapter_bytes(model: AdapterModel, spec: AdapterSpec) -> int:
    """Bytes of the adapter's weights once in `model`, from its spec and the base's shapes
    (adapter weights are fp32 whatever the base's dtype: model/lora.py)."""
    layers = model.model.model.layers
    attn, mlp = layers[0].self_attn, layers[0].mlp.base

    def lora(proj: torch.nn.Linear, r: int, dora: bool) -> int:
        out_f, in_f = proj.weight.shape
        return r * (in_f + out_f) + (out_f if dora else 0)

    per_layer = sum(
        lora(getattr(attn, p), spec.lora.r, spec.lora.dora) for p in spec.attention_targets
    )
    if spec.is_mixlora:
        hidden = mlp.gate_proj.weight.shape[1]
        experts = sum(
            lora(getattr(mlp, p), spec.expert.r, spec.expert.dora) for p in spec.mlp_targets
        )
        per_layer += spec.num_experts * (experts + hidden)  # + the router (E, H)
    else:
        per_layer += sum(
            lora(getattr(mlp, p), spec.lora.r, spec.lora.dora) for p in spec.mlp_targets
        )
    return 4 * per_layer * len(layers)
