"""A frozen base model with multi-adapter layers injected: add/remove adapters and run fused
batches whose row blocks each go through their own adapter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from mixloom.model.batch import FusedState, Segment, TokenShare
from mixloom.model.lora import LoraWeights, MultiLoraLinear
from mixloom.model.moe import MixLoraWeights, MultiAdapterMLP
from mixloom.model.packing import repack
from mixloom.model.routing import RouterTotals, aux_loss, router_totals
from mixloom.model.specs import AdapterSpec

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _layers(model: Any) -> Any:
    return model.model.layers


class AdapterModel(nn.Module):
    """Wraps a HF LLaMA-family causal LM. Adapters live inside the wrapped layers (one entry
    per adapter name); `adapter_parameters(name)` are what a job's optimizer owns."""

    def __init__(
        self, model: Any, *, backend: str = "torch", recompute: bool | None = None
    ) -> None:
        """`recompute`: adapter activations (MixLoRA experts, dropout-masked LoRA inputs)
        recomputed in the backward instead of kept (FusedState.recomputed). None: on a GPU,
        where memory is what limits how many jobs fit; off on a CPU, where RAM is ample and
        the recomputation costs 5-15% of a step (bench/RESULTS.md)."""
        super().__init__()
        model.requires_grad_(False)  # the base never trains (adapters are added after this)
        self.model = model
        if recompute is None:
            recompute = next(model.parameters()).device.type == "cuda"
        self.state = FusedState(backend=backend, recompute=recompute)
        self.specs: dict[str, AdapterSpec] = {}
        # adapter name -> its packing group (add_adapter): "" for training jobs
        self.pack_groups: dict[str, str] = {}
        self.generators: dict[str, torch.Generator] = self.state.generators
        for layer in _layers(model):
            attn = layer.self_attn
            for proj in _ATTENTION:
                base = getattr(attn, proj)
                if not isinstance(base, MultiLoraLinear):
                    setattr(attn, proj, MultiLoraLinear(base, self.state))
            if not isinstance(layer.mlp, MultiAdapterMLP):
                layer.mlp = MultiAdapterMLP(layer.mlp, self.state)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def backbone(self) -> nn.Module:
        """The decoder stack: input ids -> `last_hidden_state` (B, T, H), no vocabulary
        projection (the trainer projects only the positions that have a target)."""
        return self.model.model  # type: ignore[no-any-return]

    @property
    def lm_head(self) -> nn.Linear:
        """The vocabulary projection, (V, H) weight."""
        return self.model.lm_head  # type: ignore[no-any-return]

    # -- adapters ----------------------------------------------------------------------

    def add_adapter(self, spec: AdapterSpec, *, pack_group: str = "") -> None:
        """Create the adapter's weights (deterministic from spec.seed) and its RNG stream.
        `pack_group`: the adapters whose weights share blocks of memory (model/packing.py);
        adding or removing one moves only its group's weights. The inference engine keeps its
        adapters in a group of their own, so that loading one never moves (or copies) the
        weights of the jobs being trained."""
        if spec.name in self.specs:
            raise ValueError(f"adapter {spec.name!r} already exists")
        init = torch.Generator().manual_seed(spec.seed)
        for layer in _layers(self.model):
            for proj in spec.attention_targets:
                mod: MultiLoraLinear = getattr(layer.self_attn, proj)
                mod.adapters[spec.name] = LoraWeights(mod.base, spec.lora, init)
            mlp: MultiAdapterMLP = layer.mlp
            if spec.is_mixlora:
                mlp.moe[spec.name] = MixLoraWeights(mlp.base, spec, init)
            elif spec.mlp_targets:
                mlp.lora[spec.name] = nn.ModuleDict(
                    {
                        p: LoraWeights(getattr(mlp.base, p), spec.lora, init)
                        for p in spec.mlp_targets
                    }
                )
            mlp.specs[spec.name] = spec
        self.specs[spec.name] = spec
        # on the host whatever the device: dropout draws seeds from it (no device work)
        self.generators[spec.name] = torch.Generator().manual_seed(spec.seed + 1)
        self.pack_groups[spec.name] = pack_group
        self._repack(pack_group)

    def remove_adapter(self, name: str) -> None:
        for layer in _layers(self.model):
            for proj in _ATTENTION:
                adapters = getattr(layer.self_attn, proj).adapters
                if name in adapters:
                    del adapters[name]
            mlp = layer.mlp
            for d in (mlp.lora, mlp.moe):
                if name in d:
                    del d[name]
            mlp.specs.pop(name, None)
        self.specs.pop(name, None)
        self.generators.pop(name, None)
        self._repack(self.pack_groups.pop(name, ""))

    def _repack(self, pack_group: str) -> None:
        """Each projection's weights of every adapter of the group back to back in one block,
        in the order the adapters joined, which is the order of a fused batch
        (model/packing.py)."""
        names = {n for n, g in self.pack_groups.items() if g == pack_group}
        for layer in _layers(self.model):
            groups: list[list[LoraWeights]] = [
                [w for n, w in getattr(layer.self_attn, proj).adapters.items() if n in names]
                for proj in _ATTENTION
            ]
            mlp = layer.mlp
            lora = [d for n, d in mlp.lora.items() if n in names]
            moe = [m for n, m in mlp.moe.items() if n in names]
            for proj in _MLP:
                groups.append([d[proj] for d in lora if proj in d])
                groups.append([m.experts[proj] for m in moe if proj in m.experts])
            for group in groups:
                repack([w.lora_A for w in group])
                repack([w.lora_B for w in group])
            repack([m.router for m in moe])

    def named_adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of one adapter in a fixed order; names are model-relative."""
        for i, layer in enumerate(_layers(self.model)):
            for proj in _ATTENTION:
                adapters = getattr(layer.self_attn, proj).adapters
                if name in adapters:
                    prefix = f"layers.{i}.self_attn.{proj}"
                    yield from adapters[name].named_parameters(prefix=prefix)
            mlp = layer.mlp
            if name in mlp.lora:
                yield from mlp.lora[name].named_parameters(prefix=f"layers.{i}.mlp")
            if name in mlp.moe:
                yield from mlp.moe[name].named_parameters(prefix=f"layers.{i}.mlp")

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for _, p in self.named_adapter_parameters(name)]

    def adapter_state_dict(self, name: str) -> dict[str, Tensor]:
        return {k: p.detach().clone() for k, p in self.named_adapter_parameters(name)}

    def load_adapter_state_dict(self, name: str, state: dict[str, Tensor]) -> None:
        params = dict(self.named_adapter_parameters(name))
        missing = sorted(set(params) - set(state))
        extra = sorted(set(state) - set(params))
        if missing or extra:
            raise ValueError(
                f"adapter {name!r} state does not match its spec: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k])

    # -- running -----------------------------------------------------------------------

    @contextmanager
    def fused(
        self,
        segments: list[Segment],
        attention_mask: Tensor | None,
        *,
        training: bool,
        collect_router: bool = True,
        host_mask: Tensor | None = None,
        shares: dict[str, TokenShare] | None = None,
    ) -> Iterator[FusedState]:
        """Within the block, forwards route row blocks through their adapters. `host_mask`:
        the attention mask on the host, if the caller has it; `shares`: the jobs whose rows
        are this process's share of their micro-batch (FusedState.begin)."""
        st = self.state
        st.begin(
            segments,
            attention_mask,
            training=training,
            collect_router=collect_router,
            host_mask=host_mask,
            shares=shares,
        )
        try:
            yield st
        finally:
            st.end()

    def aux_losses(self, totals: RouterTotals | None = None) -> dict[str, Tensor]:
        """Per MixLoRA adapter: its load-balance loss over the last forward's router logs
        (or over `totals`: router_totals summed across processes)."""
        totals = self.router_totals() if totals is None else totals
        return {name: aux_loss(*t, self.specs[name]) for name, t in totals.items()}

    def router_load(self, totals: RouterTotals | None = None) -> dict[str, Tensor]:
        """Per MixLoRA adapter: the fraction of routed (token, choice) pairs each expert got,
        (E,) on the device (read it together with other values: each read waits for the
        GPU)."""
        totals = self.router_totals() if totals is None else totals
        return {name: chosen / chosen.sum().clamp(min=1) for name, (_, chosen, _) in totals.items()}

    def router_totals(self) -> RouterTotals:
        """router_totals of the batch's logs, summed once for both aux_losses and
        router_load (a training step asks for both)."""
        logs = self.state.router_logs or []
        return self.state.cached(("router_totals", len(logs)), lambda: router_totals(logs))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
