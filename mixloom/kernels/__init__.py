"""Grouped (multi-job, multi-expert) LoRA matmuls. The only package that imports triton.

Backends: "torch" (stock torch, any device: grouped.py, one grouped_mm per product; the CPU
path), "triton" (CUDA, or CPU with TRITON_INTERPRET=1: segmented.py, glu.py), "auto" (triton on
CUDA when importable, else torch; Settings.kernel_backend, MIXLOOM_KERNEL_BACKEND, overrides
"auto"). "reference" (reference.py, a plain loop over groups) is the test oracle both are
checked against; slow, not offered to users.

Every kernel takes its activations, one LoraStack (A, B, scale) per projection, and the
batch's GroupedPairs: pairs sorted by group, built once per layer call and shared by every
projection of it (as vLLM's LoRA ops share one metadata object per batch). A MixLoRA layer:

    pairs = group_pairs(groups, G, weights=topk_weights,  # groups: (T, k), -1 = none
                        with_tiles=backend == "triton")
    gate, up = base_gate(x), base_up(x)                   # (T, I) frozen, per token
    z, zsum = expert_glu(x, x, gate, up, lora_gate, lora_up, pairs, backend=backend)
    out = base_down(zsum)                                 # (T, H) down-projection identity
    out = out + lora_combine(z, lora_down, pairs, T, per_pair=True, backend=backend)

or, unfused, lora_segments(x, lora, pairs) -> (P, N) per projection. Plain LoRA over a fused
batch (job g owns rows [offsets[g], offsets[g+1])): pairs = row_blocks(offsets, device).

x is per token and gathered through pairs.rows, or, with per_pair=True, holds one row per
pair already (dropout masks drawn per pair; the down projection's z).

Dropout masks of every job of a batch in one launch (dropout.py, on CUDA): dropout_keep(seeds,
job, local, thresholds, cols), seeds one per job; counter_dropout(device) says where it is used.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mixloom.config import Settings
from mixloom.kernels import grouped, reference
from mixloom.kernels.pairs import GroupedPairs, LoraStack, group_pairs, row_blocks, tile_table

BACKENDS = ("auto", "torch", "triton", "reference")

__all__ = [
    "BACKENDS",
    "GroupedPairs",
    "LoraStack",
    "counter_dropout",
    "dropout_keep",
    "expert_glu",
    "group_pairs",
    "lora_combine",
    "lora_segments",
    "resolve_backend",
    "row_blocks",
    "settings",
    "tile_table",
]


@functools.cache
def settings() -> Settings:
    """The settings the kernels read (backend, dropout RNG, tile sizes), read once, when first
    asked: Settings() parses the environment (~1 ms on 2 CPU cores) and counter_dropout is asked
    for every projection. A test that sets a MIXLOOM_ variable calls settings.cache_clear()."""
    return Settings()


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for tensors on `device` (every kernel function
    accepts "auto" and resolves it so)."""
    if name == "auto":
        name = settings().kernel_backend
    if name not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    return name


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def counter_dropout(device: torch.device) -> bool:
    """Whether dropout masks on `device` come from dropout.py's counter-based kernel (one
    launch for every job of a batch) rather than from each job's generator (one draw per
    job): on CUDA when triton is there. Settings.dropout_rng (MIXLOOM_DROPOUT_RNG, "counter" /
    "stream") overrides; "counter" on CPU needs TRITON_INTERPRET=1 (the tests run it so)."""
    forced = settings().dropout_rng
    if forced != "auto":
        return forced == "counter"
    return device.type == "cuda" and _triton_available()


def dropout_keep(
    seeds: Tensor, job: Tensor, local: Tensor, thresholds: Tensor, cols: int
) -> Tensor:
    """(rows, cols) bool dropout keep-decisions of a batch of jobs in one launch: row r keeps
    column c when 16 Philox bits keyed by (seeds[job[r]], local[r], c), read as int16, reach
    thresholds[r]. seeds (J,) int64; job (rows,) int32; local (rows,) int64, each row's index
    among its job's rows; thresholds (rows,) int32. See dropout.py."""
    from mixloom.kernels import dropout

    return dropout.keep_mask(seeds, job, local, thresholds, cols)


def lora_segments(
    x: Tensor,
    lora: LoraStack,
    pairs: GroupedPairs,
    *,
    per_pair: bool = False,
    backend: str = "torch",
) -> Tensor:
    """Grouped LoRA: y[p] = scale[g] * (x[rows[p]] @ A[g].T) @ B[g].T. See reference.py.

    Args:
        x: (T, H) gathered through pairs.rows; (P, H) when per_pair or pairs.rows is None.
        lora: A (G, R, H), B (G, N, R), scale (G,) fp32.
        pairs: pairs before offsets[0] or from offsets[G] on belong to no group and give 0.
    Returns: (P, N) in x's dtype.
    """
    x_rows = _x_rows(x, pairs, per_pair)
    return _op("lora_segments", backend, x.device)(x, lora, pairs, x_rows)


def lora_combine(
    x: Tensor,
    lora: LoraStack,
    pairs: GroupedPairs,
    num_rows: int,
    *,
    per_pair: bool = False,
    backend: str = "torch",
) -> Tensor:
    """Grouped LoRA, weighted and summed per output row (MixLoRA's expert combine):
    out[rows[p]] += weights[p] * scale[g] * (x[rows[p]] @ A[g].T) @ B[g].T.

    Args:
        x: (T_in, H) gathered through pairs.rows, or (P, H) when per_pair.
        lora, pairs: as in lora_segments; pairs needs rows (the output row of each pair) and
            weights (differentiable); pairs outside every group add nothing.
        num_rows: T_out.
    Returns: (T_out, N) in x's dtype.
    """
    _need_rows_and_weights(pairs, "lora_combine")
    x_rows = _x_rows(x, pairs, per_pair)
    return _op("lora_combine", backend, x.device)(x, lora, pairs, num_rows, x_rows)


def expert_glu(
    x_gate: Tensor,
    x_up: Tensor,
    gate: Tensor,
    up: Tensor,
    lora_gate: LoraStack,
    lora_up: LoraStack,
    pairs: GroupedPairs,
    *,
    per_pair: bool = False,
    backend: str = "torch",
) -> tuple[Tensor, Tensor]:
    """MixLoRA expert gate/up, fused: LoRA deltas on the frozen gate/up of each pair's token,
    SiLU(gate) * up, and the routing-weighted sum per token (the frozen down's input).

    Per pair p of group g, t = rows[p]:
        z[p] = silu(gate[t] + s_g[g] * LoRA_g(x_gate)[p]) * (up[t] + s_u[g] * LoRA_u(x_up)[p])
        zsum[t] = sum over the token's pairs of weights[p] * z[p]

    Args:
        x_gate, x_up: (T, H) LoRA inputs (the same tensor without dropout), gathered through
            pairs.rows; (P, H) when per_pair (dropout masks per pair).
        gate, up: (T, I) frozen projections of every token. lora_gate, lora_up: B (G, I, R).
        pairs: with rows (the token of each pair) and weights.
    Returns: z (P, I) (input of the experts' down LoRA), zsum (T, I) (input of the frozen
    down projection, by the down-projection identity); both in gate's dtype.
    """
    _need_rows_and_weights(pairs, "expert_glu")
    x_rows = _x_rows(x_gate, pairs, per_pair)
    run = _op("expert_glu", backend, gate.device)
    return run(x_gate, x_up, gate, up, lora_gate, lora_up, pairs, x_rows)  # type: ignore[no-any-return]


def _op(name: str, backend: str, device: torch.device) -> Callable[..., Any]:
    """Kernel function `name` of the backend that runs on `device`."""
    backend = resolve_backend(backend, device)
    if backend == "triton":
        module = "glu" if name == "expert_glu" else "segmented"
        return getattr(importlib.import_module(f"mixloom.kernels.{module}"), name)  # type: ignore[no-any-return]
    return getattr(reference if backend == "reference" else grouped, name)  # type: ignore[no-any-return]


def _x_rows(x: Tensor, pairs: GroupedPairs, per_pair: bool) -> Tensor | None:
    """The row of x each pair reads: pairs.rows, or None where x holds a row per pair."""
    if not per_pair and pairs.rows is not None:
        return pairs.rows
    if x.shape[0] != pairs.num_pairs:
        raise ValueError(
            f"a per-pair input has one row per pair ({pairs.num_pairs}), got {x.shape[0]}"
        )
    return None


def _need_rows_and_weights(pairs: GroupedPairs, op: str) -> None:
    if pairs.rows is None or pairs.weights is None:
        raise ValueError(
            f"{op} needs pairs with rows and routing weights: group_pairs(..., weights=...)"
        )
