"""Paged key/value cache and the attention that reads it.

The cache holds, per layer, one K and one V pool of `blocks * block_tokens` slots, each slot
one token's (kv_heads, head_dim) keys or values. A sequence owns a list of blocks, reserved
when its request is admitted for everything it may write (prompt + max_tokens), so a running
sequence never waits for memory and nothing is ever preempted. Token `pos` of a sequence
lives in slot `blocks[pos // block_tokens] * block_tokens + pos % block_tokens`.

A decoding step runs the model over a flat batch of N new tokens, one per batch row, (N, 1):
the multi-adapter layers then see each token as a row of its own, so rows of any adapter, and
a prompt chunk beside single decode tokens, share the forward. Attention is the one place
where tokens of a sequence meet: `paged_attention` (registered with transformers as the
attention implementation `ATTENTION`) writes the step's new keys and values into their slots
and runs each query group of the `StepPlan` against the keys of its sequences, gathered from
the pools. The plan is built once a step on the host and serves every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface

ATTENTION = "mixloom_paged"  # the name the engine sets as config._attn_implementation
PLAN_KWARG = "mixloom_kv"  # how the StepPlan reaches paged_attention through the model's kwargs


class KVCache:
    """Per layer K and V pools (slots, kv_heads, head_dim) and the free blocks."""

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        blocks: int,
        block_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        slots = blocks * block_tokens
        self.block_tokens = block_tokens
        self.blocks = blocks
        self.k = [
            torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device)
            for _ in range(layers)
        ]
        self.v = [
            torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device)
            for _ in range(layers)
        ]
        self._free = list(range(blocks - 1, -1, -1))  # popped from the end: block 0 first

    @staticmethod
    def bytes_per_token(config: Any, dtype: torch.dtype) -> int:
        """What one cached token costs across all layers (K and V)."""
        kv_heads, head_dim = kv_shape(config)
        per_layer = 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        return int(config.num_hidden_layers) * per_layer

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def allocate(self, n: int) -> list[int]:
        """n free blocks; the caller checked free_blocks."""
        assert n <= len(self._free), "allocate: not enough free blocks"
        taken = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        return taken

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def slot(self, blocks: list[int], pos: int) -> int:
        return blocks[pos // self.block_tokens] * self.block_tokens + pos % self.block_tokens

    def copy_prefix(self, src: list[int], dst: list[int], tokens: int) -> None:
        """Copy the first `tokens` tokens' keys and values of one sequence to another (the
        samples of one prompt share its prefill)."""
        device = self.k[0].device
        s = torch.tensor([self.slot(src, p) for p in range(tokens)], device=device)
        d = torch.tensor([self.slot(dst, p) for p in range(tokens)], device=device)
        for pool in (*self.k, *self.v):
            pool.index_copy_(0, d, pool.index_select(0, s))


def kv_shape(config: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of a HF decoder config."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return kv_heads, head_dim


@dataclass
class QueryGroup:
    """Queries that run as one attention call: R sequences with c new tokens each (decode
    rows: R sequences, c = 1; a prompt chunk: R = 1, c tokens).

    rows (R*c,) int64: the queries' rows in the flat batch, sequence-major;
    q_pos (R, c) int64: their positions in their sequences;
    table (R, nb) int64: each sequence's blocks (padded with block 0: masked);
    keys: how many key positions to read (max position + 1)."""

    rows: Tensor
    q_pos: Tensor
    table: Tensor
    keys: int
    _masks: dict[int | None, Tensor] = field(default_factory=dict)
    _slots: Tensor | None = None

    def slots(self, block_tokens: int) -> Tensor:
        """(R, keys) cache slot of every key position of each sequence."""
        if self._slots is None:
            offsets = torch.arange(block_tokens, device=self.table.device)
            every = (self.table[:, :, None] * block_tokens + offsets).flatten(1)  # (R, nb*bt)
            self._slots = every[:, : self.keys]
        return self._slots

    def mask(self, sliding_window: int | None) -> Tensor:
        """(R, 1, c, keys) bool: key j is seen by the query at position i when j <= i (and,
        with a sliding window W, j > i - W, as transformers' masks have it)."""
        if sliding_window not in self._masks:
            j = torch.arange(self.keys, device=self.q_pos.device)
            i = self.q_pos[:, :, None]  # (R, c, 1)
            seen = j <= i
            if sliding_window is not None:
                seen &= j > i - sliding_window
            self._masks[sliding_window] = seen[:, None]
        return self._masks[sliding_window]


@dataclass
class StepPlan:
    """Where a step's N new tokens go in the cache and what each query attends to."""

    cache: KVCache
    write_slots: Tensor  # (N,) int64: the cache slot of each new token's key and value
    groups: list[QueryGroup]


def paged_attention(
    module: Any,
    query: Tensor,  # (N, heads, 1, head_dim), rotary applied
    key: Tensor,  # (N, kv_heads, 1, head_dim), rotary applied
    value: Tensor,  # (N, kv_heads, 1, head_dim)
    attention_mask: Tensor | None,  # unused: the plan's masks say what each query sees
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function protocol over the paged cache: (N, 1, heads,
    head_dim) outputs, no weights. Reads the StepPlan from the `PLAN_KWARG` keyword."""
    plan: StepPlan | None = kwargs.get(PLAN_KWARG)
    if plan is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION!r} runs only inside the inference engine's "
            "step (it needs the step's cache plan)"
        )
    layer = module.layer_idx
    k_pool, v_pool = plan.cache.k[layer], plan.cache.v[layer]
    k_pool.index_copy_(0, plan.write_slots, key[:, :, 0].to(k_pool.dtype))
    v_pool.index_copy_(0, plan.write_slots, value[:, :, 0].to(v_pool.dtype))
    n, heads, _, head_dim = query.shape
    out = query.new_empty(n, heads, head_dim)
    for g in plan.groups:
        r, c = g.q_pos.shape
        q = query.index_select(0, g.rows).view(r, c, heads, head_dim).transpose(1, 2)
        slots = g.slots(plan.cache.block_tokens)  # (R, L)
        k = k_pool[slots].transpose(1, 2)  # (R, kv_heads, L, head_dim)
        v = v_pool[slots].transpose(1, 2)
        o = _attend(q, k, v, g.mask(sliding_window), scaling, softcap)  # (R, heads, c, d)
        out.index_copy_(0, g.rows, o.transpose(1, 2).reshape(r * c, heads, head_dim))
    return out[:, None], None


def _attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scaling: float | None, softcap: float | None
) -> Tensor:
    """Softmax attention of q (R, H, c, d) over k, v (R, Hkv, L, d) where mask (R, 1, c, L)."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True
        )
    # Gemma 2 caps the scores (tanh) before the softmax, which SDPA cannot express
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (R, H, c, L)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v


AttentionInterface.register(ATTENTION, paged_attention)
