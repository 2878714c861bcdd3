"""Adapter specifications: what one job's adapter looks like, independent of any batch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mixloom.jobspec import (
    ATTENTION_MODULES,
    MLP_MODULES,
    LoraHyperparameters,
    MixLoraHyperparameters,
    Routing,
)


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    rslora: bool = False
    dora: bool = False
    init: str = "original"  # "original": A ~ kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


@dataclass(frozen=True)
class AdapterSpec:
    """One job's adapter. kind "lora": plain LoRA on `targets`; kind "mixlora": LoRA on the
    attention targets plus an MoE of `num_experts` LoRA experts over the frozen FFN."""

    name: str
    kind: str = "lora"  # "lora" | "mixlora"
    targets: tuple[str, ...] = ATTENTION_MODULES + MLP_MODULES
    lora: LoraSpec = field(default_factory=LoraSpec)
    seed: int = 42
    # MixLoRA only
    num_experts: int = 8
    routing: str = Routing.TOP_K.value
    top_k: int = 2
    top_p: float = 0.8
    aux_loss_coef: float = 0.01
    router_init_range: float = 0.02
    jitter_noise: float = 0.0
    expert: LoraSpec = field(default_factory=LoraSpec)

    @property
    def is_mixlora(self) -> bool:
        return self.kind == "mixlora"

    @property
    def attention_targets(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets if t in ATTENTION_MODULES)

    @property
    def mlp_targets(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets if t in MLP_MODULES)

    @property
    def slots(self) -> int:
        """Experts chosen per token (top_p may choose up to num_experts)."""
        if self.routing == Routing.SWITCH:
            return 1
        if self.routing == Routing.TOP_P:
            return self.num_experts
        return self.top_k

    @classmethod
    def from_hyperparameters(
        cls, name: str, hp: LoraHyperparameters, *, seed: int = 42
    ) -> AdapterSpec:
        lora = LoraSpec(
            r=hp.r,
            alpha=float(hp.lora_alpha),
            dropout=hp.lora_dropout,
            rslora=hp.use_rslora,
            dora=hp.use_dora,
            init=hp.lora_init,
        )
        if not isinstance(hp, MixLoraHyperparameters):
            return cls(
                name=name, kind="lora", targets=tuple(hp.target_modules), lora=lora, seed=seed
            )
        expert = LoraSpec(
            r=hp.expert_r,
            alpha=float(hp.expert_alpha),
            dropout=hp.expert_dropout,
            rslora=hp.expert_rslora,
            dora=hp.expert_dora,
            init=hp.lora_init,
        )
        return cls(
            name=name,
            kind="mixlora",
            targets=tuple(hp.target_modules),
            lora=lora,
            seed=seed,
            num_experts=hp.num_experts,
            routing=Routing(hp.routing).value,
            top_k=hp.top_k,
            top_p=hp.top_p,
            aux_loss_coef=hp.router_aux_loss_coef,
            router_init_range=hp.router_init_range,
            jitter_noise=hp.jitter_noise,
            expert=expert,
        )
