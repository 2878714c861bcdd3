"""Grouped (multi-job, multi-expert) LoRA matmuls. The only package that imports triton.

Backends: "torch" (stock torch, any device: grouped.py, one grouped_mm per product; the CPU
path), "triton" (CUDA, or CPU with TRITON_INTERPRET=1), "auto" (triton on CUDA when importable,
else torch). Env MIXLOOM_KERNEL_BACKEND overrides "auto". "reference" (reference.py, a plain
loop over groups) is the test oracle both are checked against; slow, not offered to users.

Typical MixLoRA layer call (routing built once, shared by gate/up/down of every expert):

    r = build_routing(groups, G, with_tiles=backend == "triton")  # groups: (T, k), -1 = none
    w = topk_weights.reshape(-1)[r.order]                         # (P,) routing weights
    kw = dict(backend=backend, tiles=r.tiles)
    gate, up = base_gate(x), base_up(x)                           # (T, I) frozen, per token
    z, zsum = expert_glu(x, x, gate, up, Ag, Bg, Au, Bu, s, s, r.offsets, r.rows, w, r.rows,
                         **kw)                                    # (P, I), (T, I)
    out = base_down(zsum)                                         # down-projection identity
    out = out + lora_combine(z, Ad, Bd, s, r.offsets, w, r.rows, T, **kw)  # (T, H)

or, unfused, lora_segments(x, Ag, Bg, s, r.offsets, r.rows, **kw) -> (P, I) per projection.

Dropout masks of every job of a batch in one launch (dropout.py, on CUDA): dropout_keep(seeds,
job, local, thresholds, cols), seeds one per job; counter_dropout(device) says where it is used.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from mixloom.kernels import grouped, reference
from mixloom.kernels.routing import Routing, build_routing, tile_table

BACKENDS = ("auto", "torch", "triton", "reference")

__all__ = [
    "BACKENDS",
    "Routing",
    "build_routing",
    "counter_dropout",
    "dropout_keep",
    "expert_glu",
    "lora_combine",
    "lora_segments",
    "resolve_backend",
    "tile_table",
]


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for tensors on `device` (every kernel function
    accepts "auto" and resolves it so)."""
    if name == "auto":
        name = os.environ.get("MIXLOOM_KERNEL_BACKEND", "auto")
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
    job): on CUDA when triton is there. Env MIXLOOM_DROPOUT_RNG ("counter" / "stream")
    overrides; "counter" on CPU needs TRITON_INTERPRET=1 (the tests run it so)."""
    forced = os.environ.get("MIXLOOM_DROPOUT_RNG", "auto")
    if forced not in ("auto", "counter", "stream"):
        raise ValueError(f"MIXLOOM_DROPOUT_RNG must be auto, counter or stream, got {forced!r}")
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
    A: Tensor,
    B: Tensor,
    scale: Tensor,
    offsets: Tensor,
    rows: Tensor | None = None,
    *,
    backend: str = "torch",
    tiles: Tensor | None = None,
) -> Tensor:
    """Grouped LoRA: y[p] = scale[g] * (x[rows[p]] @ A[g].T) @ B[g].T. See reference.py.

    Args:
        x: (T, H). A: (G, R, H). B: (G, N, R). scale: (G,) fp32. offsets: (G+1,) int64;
        pairs before offsets[0] or from offsets[G] on belong to no group and give 0.
        rows: (P,) int64 or None (P == T).
        tiles: the triton tile table (Routing.tiles); built from offsets when None.
    Returns: (P, N) in x's dtype.
    """
    backend = resolve_backend(backend, x.device)
    if backend == "triton":
        from mixloom.kernels import segmented

        return segmented.lora_segments(x, A, B, scale, offsets, rows, tiles)
    if backend == "reference":
        return reference.lora_segments(x, A, B, scale, offsets, rows)
    return grouped.lora_segments(x, A, B, scale, offsets, rows)


def lora_combine(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scale: Tensor,
    offsets: Tensor,
    weights: Tensor,
    dst: Tensor,
    num_rows: int,
    rows: Tensor | None = None,
    *,
    backend: str = "torch",
    tiles: Tensor | None = None,
) -> Tensor:
    """Grouped LoRA, weighted and summed per output row (MixLoRA's expert combine):
    out[dst[p]] += weights[p] * scale[g] * (x[rows[p]] @ A[g].T) @ B[g].T.

    Args:
        x: (T_in, H); per pair (T_in == P) when rows is None. A, B, scale, offsets: as in
        lora_segments; pairs outside every group add nothing.
        weights: (P,) routing weight of each pair (differentiable). dst: (P,) int64 output row.
        num_rows: T_out.
    Returns: (T_out, N) in x's dtype.
    """
    backend = resolve_backend(backend, x.device)
    if backend == "triton":
        from mixloom.kernels import segmented

        return segmented.lora_combine(x, A, B, scale, offsets, weights, dst, num_rows, rows, tiles)
    if backend == "reference":
        return reference.lora_combine(x, A, B, scale, offsets, weights, dst, num_rows, rows)
    return grouped.lora_combine(x, A, B, scale, offsets, weights, dst, num_rows, rows)


def expert_glu(
    x_gate: Tensor,
    x_up: Tensor,
    gate: Tensor,
    up: Tensor,
    A_gate: Tensor,
    B_gate: Tensor,
    A_up: Tensor,
    B_up: Tensor,
    scale_gate: Tensor,
    scale_up: Tensor,
    offsets: Tensor,
    rows: Tensor,
    weights: Tensor,
    x_rows: Tensor | None = None,
    *,
    backend: str = "torch",
    tiles: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """MixLoRA expert gate/up, fused: LoRA deltas on the frozen gate/up of each pair's token,
    SiLU(gate) * up, and the routing-weighted sum per token (the frozen down's input).

    Per pair p of group g, t = rows[p]:
        z[p] = silu(gate[t] + s_g[g] * LoRA_g(x_gate)[p]) * (up[t] + s_u[g] * LoRA_u(x_up)[p])
        zsum[t] = sum over the token's pairs of weights[p] * z[p]

    Args:
        x_gate, x_up: (T_in, H) LoRA inputs (the same tensor without dropout); gathered with
            x_rows (P,), or one row per pair when x_rows is None (dropout masks per pair).
        gate, up: (T, I) frozen projections of every token. A_*: (G, R, H). B_*: (G, I, R).
        scale_*: (G,) fp32. offsets: (G+1,). rows: (P,) token of each pair. weights: (P,).
    Returns: z (P, I) (input of the experts' down LoRA), zsum (T, I) (input of the frozen
    down projection, by the down-projection identity); both in gate's dtype.
    """
    args = (x_gate, x_up, gate, up, A_gate, B_gate, A_up, B_up, scale_gate, scale_up, offsets)
    backend = resolve_backend(backend, gate.device)
    if backend == "triton":
        from mixloom.kernels import glu

        return glu.expert_glu(*args, rows, weights, x_rows, tiles)
    if backend == "reference":
        return reference.expert_glu(*args, rows, weights, x_rows)
    return grouped.expert_glu(*args, rows, weights, x_rows)
