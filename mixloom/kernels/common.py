"""Triton helpers the kernels share (segmented.py, glu.py, dropout.py): whether they run in
triton's interpreter, their tile sizes, the tile-table preamble, the dot, the device check.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from mixloom.kernels.pairs import GroupedPairs, tile_table

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def mma(a, b, acc, DOT_FP32: tl.constexpr, DOT: tl.constexpr):
    """acc += a @ b in fp32: both tiles cast to fp32 (ieee) if DOT_FP32, else to DOT (the
    activations' fp16/bf16, for the tensor cores: fp32 adapter weights over a bf16 base are
    rounded there, as under autocast)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a.to(DOT), b.to(DOT), acc)


@triton.jit
def tile_pairs(tiles_ptr, offsets_ptr, n_tiles, BLOCK_M: tl.constexpr):
    """This program's tile of the table (GroupedPairs.tiles): its group g, -1 for a padding
    tile (the caller returns at once), its BLOCK_M pairs and which of them are g's."""
    t = tl.program_id(0)
    g = tl.load(tiles_ptr + t)
    start = tl.load(tiles_ptr + n_tiles + t)
    end = tl.load(offsets_ptr + g + 1)  # g = -1: offsets[0], read and not used
    offs_m = start + tl.arange(0, BLOCK_M)
    return g, offs_m, offs_m < end


@triton.jit
def expand_tile(h_ptr, w_ptr, g, offs_m, mask_m, offs_n, mask_n, R, stride_hm, stride_hr,
                stride_wg, stride_wn, stride_wr, DOT_FP32: tl.constexpr, DOT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_R: tl.constexpr):  # fmt: skip
    """(BLOCK_M, BLOCK_N) fp32 tile of h[offs_m] @ w[g, offs_n].T: h (P, R) fp32 rank-space
    rows, w (G, N, R) any strides; the whole rank in one block."""
    offs_r = tl.arange(0, BLOCK_R)
    h = tl.load(
        h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_r[None, :] * stride_hr,
        mask=mask_m[:, None] & (offs_r[None, :] < R),
        other=0.0,
    )  # (BLOCK_M, BLOCK_R)
    w = tl.load(
        w_ptr
        + g.to(tl.int64) * stride_wg
        + offs_r[:, None] * stride_wr
        + offs_n[None, :] * stride_wn,
        mask=(offs_r[:, None] < R) & mask_n[None, :],
        other=0.0,
    )  # (BLOCK_R, BLOCK_N)
    return mma(h, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32, DOT)


# Triton reads TRITON_INTERPRET once, when it decorates a kernel (at import): the decorated
# kernel says what the kernels are, where the variable read again may have changed since.
INTERPRETED = isinstance(mma, InterpretedFunction)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch options; the defaults are a GPU's (H200, bench/RESULTS.md)."""

    # Pairs per tile, the tile table's unit: 64 gathered rows x 128 features of bf16 is a
    # 16 KiB tile.
    block_m: int = 64
    block_k: int = 128  # shrink's reduction step over the input features
    # Expand's output columns per program. H200, DESIGN shape, 128 -> 256 columns everywhere:
    # lora_segments (stored expands) fwd+bwd 0.913 -> 0.826 ms, but lora_combine (its expands
    # scatter-add) 1.458 -> 1.902 ms; hence one width per mode.
    block_n: int = 256  # expand that stores
    block_n_add: int = 128  # expand that scatter-adds
    block_p: int = 64  # weight-grad reduction step over the pairs of a group
    block_f: int = 128  # weight-grad tile over the wide (feature) dimension
    warps: int = 4
    stages: int = 3
    # Register budget, not measured yet: the glu forward keeps ~5 and its backward ~8
    # (BLOCK_M, BLOCK_N) fp32 tiles live; at 64 x 128 and 4 warps one tile is 64 registers a
    # thread, so 8 warps, and 64 columns in the backward, keep them under 255 instead of
    # spilling.
    glu_warps: int = 8
    glu_block_n_fwd: int = 128
    glu_block_n_bwd: int = 64


# Small tiles under the interpreter: fast CPU tests that still cross tile edges.
_INTERPRETER_TILES = Tiles(
    block_m=16, block_k=32, block_n=32, block_n_add=32, block_p=16, block_f=32, stages=1,
    glu_warps=4, glu_block_n_fwd=32, glu_block_n_bwd=32,
)  # fmt: skip


@functools.cache
def tiles() -> Tiles:
    """The kernels' tiles: Settings' kernel_* fields (MIXLOOM_KERNEL_BLOCK_M, ...) where set,
    read once, at the first launch (a tile table built for one BLOCK_M must meet kernels
    launched with it)."""
    from mixloom.kernels import settings

    s = settings()
    given = {f.name: getattr(s, f"kernel_{f.name}") for f in fields(Tiles)}
    base = _INTERPRETER_TILES if INTERPRETED else Tiles()
    return replace(base, **{name: v for name, v in given.items() if v is not None})


def dot_options(dtype: torch.dtype) -> dict[str, Any]:
    """The constexprs of `mma` for activations of `dtype` (the interpreter's bf16 arithmetic
    is silently wrong: fp32 there)."""
    return dict(DOT_FP32=INTERPRETED or dtype == torch.float32, DOT=TL_DTYPE[dtype])


def block_r(R: int) -> int:
    # tl.dot needs every block dim >= 16 on a GPU (8x8 passes the interpreter, not the GPU).
    return max(16, triton.next_power_of_2(R))


def check_device(*ts: Tensor) -> None:
    dev = ts[0].device
    if dev.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"the triton kernels need CUDA tensors (got {dev}); use backend='torch' on CPU, "
            "or set TRITON_INTERPRET=1 before mixloom imports its triton kernels"
        )
    for t in ts:
        if t.device != dev:
            raise ValueError(f"all kernel inputs must be on one device: {t.device} vs {dev}")


def with_tiles(pairs: GroupedPairs) -> GroupedPairs:
    """`pairs` with a tile table for these kernels' BLOCK_M (built here when it has none)."""
    bm, P, G = tiles().block_m, pairs.num_pairs, pairs.num_groups
    if pairs.tiles is None:
        return replace(pairs, tiles=tile_table(pairs.offsets, P, bm))
    if pairs.tiles.shape != (2, triton.cdiv(P, bm) + G):
        raise ValueError(
            f"tile table of shape {tuple(pairs.tiles.shape)} was not built for {P} pairs, "
            f"{G} groups and {bm}-pair tiles: build it with group_pairs(..., with_tiles=True) "
            "or tile_table()"
        )
    return pairs
