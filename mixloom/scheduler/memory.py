"""Memory admission: what the base model, each job's adapter + optimizer state, and one
fused step's activations cost, estimated from shapes alone (no torch, no allocation).

The estimate is deliberately conservative (`SAFETY`): admitting a job that then runs out
of memory costs a back-off and a retry, refusing one that would have fitted only costs
throughput.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixloom.jobspec import ATTENTION_MODULES, LoraHyperparameters, MixLoraHyperparameters

GIB = 1024**3
SAFETY = 1.25  # multiplier on the activation estimate (allocator slack, temporaries)
ADAPTER_BYTES_PER_PARAM = 16  # fp32 weight + fp32 grad + AdamW exp_avg + exp_avg_sq


@dataclass(frozen=True)
class ModelShape:
    """The frozen base model's dimensions, read from its config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int  # 4 fp32, 2 bf16/fp16
    base_bytes: int  # the base model's parameters as loaded
    # how the trainer runs on it: adapter activations recomputed in the backward
    # (AdapterModel's `recompute`), so the experts' per-pair ones live one layer at a time
    recompute: bool = False

    @classmethod
    def from_config(
        cls, config: Any, *, dtype_bytes: int, base_bytes: int, recompute: bool = False
    ) -> ModelShape:
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        return cls(
            layers=int(config.num_hidden_layers),
            hidden=hidden,
            intermediate=int(config.intermediate_size),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
            vocab=int(config.vocab_size),
            dtype_bytes=dtype_bytes,
            base_bytes=base_bytes,
            recompute=recompute,
        )

    def projection(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a targetable projection."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[name]


def adapter_parameters(shape: ModelShape, hp: LoraHyperparameters) -> int:
    """Trainable parameters of one job's adapter (LoRA A/B, DoRA magnitudes, routers)."""

    def lora(name: str, r: int, dora: bool) -> int:
        fin, fout = shape.projection(name)
        return r * (fin + fout) + (fout if dora else 0)

    per_layer = 0
    for name in hp.target_modules:
        if name in ATTENTION_MODULES or not isinstance(hp, MixLoraHyperparameters):
            per_layer += lora(name, hp.r, hp.use_dora)
        else:
            per_layer += hp.num_experts * lora(name, hp.expert_r, hp.expert_dora)
    if isinstance(hp, MixLoraHyperparameters):
        per_layer += shape.hidden * hp.num_experts
    return per_layer * shape.layers


def job_state_bytes(shape: ModelShape, hp: LoraHyperparameters) -> int:
    """Bytes a job holds for as long as it is admitted: its adapter and optimizer state."""
    return adapter_parameters(shape, hp) * ADAPTER_BYTES_PER_PARAM


def _experts_chosen(hp: LoraHyperparameters) -> int:
    if not isinstance(hp, MixLoraHyperparameters):
        return 0
    if hp.routing == "switch":
        return 1
    if hp.routing == "top_p":
        return hp.num_experts
    return hp.top_k


def activation_bytes(
    shape: ModelShape, hp: LoraHyperparameters, rows: int, width: int, *, targets: int
) -> int:
    """Activations kept for the backward of one job's `rows` x `width` block of a step.

    Per token and layer the frozen LLaMA block keeps about 6 hidden-size tensors for the
    backward (norm inputs, q/k/v, attention output, LoRA inputs; frozen weights need no
    saved inputs) and 4 intermediate-size ones (gate, up, act, product); each chosen
    MixLoRA expert adds its own gate/up/product
    in fp32, in every layer, or in one layer at a time when the trainer recomputes them in
    the backward (shape.recompute); LoRA adds an r-wide input per target; attention
    probabilities are rows x
    heads x width^2 (the math path; fused kernels need less). The vocabulary projection
    and cross-entropy run fused in row chunks (trainer/loss.py): at most one chunk of fp32
    logits lives at a time, plus an fp32 hidden-size gradient per target token.
    """
    tokens = rows * width
    d = shape.dtype_bytes
    per_token = 6 * shape.hidden * d + 4 * shape.intermediate * d
    per_token += 4 * hp.r * len(hp.target_modules)
    experts = tokens * _experts_chosen(hp) * 3 * shape.intermediate * 4
    per_layer = tokens * per_token + rows * shape.heads * width * width * d
    experts_kept = experts * (1 if shape.recompute else shape.layers)
    from mixloom.trainer.loss import chunk_rows  # here: this module stays torch-free

    logits = min(targets, chunk_rows(shape.vocab)) * shape.vocab * 4 * 2
    logits += targets * shape.hidden * 4
    return int(SAFETY * (per_layer * shape.layers + experts_kept + logits))


def step_bytes_upper_bound(
    shape: ModelShape, hp: LoraHyperparameters, rows_per_example: int = 1
) -> int:
    """Activations of the job's largest possible micro-batch (micro rows of max_seq_len;
    `rows_per_example`: 2 for a DPO job, whose examples are pairs)."""
    width, rows = hp.max_seq_len, hp.micro_batch_rows * rows_per_example
    return activation_bytes(shape, hp, rows, width, targets=rows * width)


@dataclass(frozen=True)
class Admission:
    ok: bool
    reason: str = ""
    never: bool = False  # it cannot fit even on an empty worker


def admit(
    shape: ModelShape,
    hp: LoraHyperparameters,
    *,
    budget: int,
    admitted_state: int,
    rows_per_example: int = 1,
) -> Admission:
    """May a job join a worker whose admitted jobs already hold `admitted_state` bytes?

    It must fit beside them with room for its own largest step (the scheduler then never
    composes a step whose activations exceed what is left; see policy.compose_step).
    """
    state = job_state_bytes(shape, hp)
    act = step_bytes_upper_bound(shape, hp, rows_per_example)
    need_alone = shape.base_bytes + state + act
    if need_alone > budget:
        return Admission(
            False,
            f"needs about {need_alone / GIB:.2f} GiB (base model {shape.base_bytes / GIB:.2f}, "
            f"adapter + optimizer {state / GIB:.2f}, largest step {act / GIB:.2f}) but this "
            f"worker's memory budget is {budget / GIB:.2f} GiB; lower micro_batch_size, "
            "max_seq_len, r or num_experts",
            never=True,
        )
    need = shape.base_bytes + admitted_state + state + act
    if need > budget:
        free = budget - shape.base_bytes - admitted_state
        return Admission(
            False,
            f"waiting for memory: needs {(state + act) / GIB:.2f} GiB, "
            f"{max(0, free) / GIB:.2f} GiB free beside the running jobs",
        )
    return Admission(True)
