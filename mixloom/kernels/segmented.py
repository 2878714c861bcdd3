"""Segmented (multi-job, multi-expert) LoRA matmuls in Triton.

Three kernels cover the forward and backward of every grouped LoRA product:
- `_shrink_kernel`: out[p] = s[g] * src[rows[p]] @ W[g].T   (P, K) -> (P, R), gathered rows
- `_expand_kernel`: out[p] (or out[dst[p]] +=) = s[g] * w[p] * h[p] @ W[g].T   (P, R) -> (P, N)
- `_seg_outer_kernel`: out[g] = s[g] * sum_{p in g} a[ra[p]].T @ b[rb[p]]   per-group weight
  gradients; one program owns one output tile of one group and loops over that group's pairs,
  so no atomics and a deterministic result.
- `_zero_outside_kernel`: zeroes rows of pairs that belong to no group (build_routing's -1).

H200, DESIGN.md shape (G=64, top-2, r=16, 4096 tokens, 4096 -> 11008, bf16), fwd+bwd of the
gathered expert LoRA: 0.83-0.91 ms vs 1.14 ms for torch's grouped_mm on gathered rows and
27.2 ms for a per-group loop (bench/RESULTS.md).

Shrink and expand walk a tile table (built on device from the group offsets, no host sync): tile
t covers pairs [start[t], min(start[t] + BLOCK_M, offsets[g+1])) of group g, or is padding
(g = -1) and exits at once. The table is sized by the host-known bound cdiv(P, BLOCK_M) + G.

Dtypes: x, A, B in fp32/fp16/bf16; accumulation in fp32; the rank-space intermediate h is kept
in fp32. On a GPU, dots run in the activations' dtype: fp16/bf16 on the tensor cores (fp32
adapter weights rounded there, as under autocast), fp32 activations in ieee fp32.
Under TRITON_INTERPRET=1 every tile is cast to fp32 first (the interpreter's bf16 arithmetic is
silently wrong), so the CPU tests check the kernels' indexing and math, not GPU rounding.

Layers: kernel + launcher (check, allocate, launch) -> autograd Function -> public function.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from mixloom.kernels.routing import block_m, interpret, tile_table

# Read once, as triton.jit reads TRITON_INTERPRET when it decorates the kernels below.
INTERPRET = interpret()
BLOCK_M = block_m()


def _knob(name: str, interpreted: int, gpu: int) -> int:
    """Tile sizes: small under the interpreter (fast CPU tests), tuned ones on a GPU.
    MIXLOOM_<NAME> overrides, for bench/gpu.sh's sweep."""
    return int(os.environ.get(f"MIXLOOM_{name}", interpreted if INTERPRET else gpu))


_BLOCK_K = _knob("BLOCK_K", 32, 128)  # shrink's reduction step over the input features
# Expand's output columns per program. H200, DESIGN shape, 128 -> 256 columns everywhere:
# lora_segments (stored expands) fwd+bwd 0.913 -> 0.826 ms, but lora_combine (its expands
# scatter-add) 1.458 -> 1.902 ms; hence one width per mode.
_BLOCK_N = _knob("BLOCK_N", 32, 256)  # expand that stores
_BLOCK_N_ADD = _knob("BLOCK_N_ADD", 32, 128)  # expand that scatter-adds
_BLOCK_P = _knob("BLOCK_P", 16, 64)  # weight-grad reduction step over the pairs of a group
_BLOCK_F = _knob("BLOCK_F", 32, 128)  # weight-grad tile over the wide (feature) dimension
_WARPS = _knob("WARPS", 4, 4)
_STAGES = _knob("STAGES", 1, 3)


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _block_r(R: int) -> int:
    # tl.dot needs every block dim >= 16 on a GPU (8x8 passes the interpreter, not the GPU).
    return max(16, triton.next_power_of_2(R))


def _check_device(*ts: Tensor) -> None:
    dev = ts[0].device
    if dev.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the triton kernel backend needs CUDA tensors (got {dev}); "
            "use backend='torch' on CPU, or set TRITON_INTERPRET=1 before importing mixloom.kernels"
        )
    for t in ts:
        if t.device != dev:
            raise ValueError(f"all kernel inputs must be on one device: {t.device} vs {dev}")


@triton.jit
def _mma(a, b, acc, DOT_FP32: tl.constexpr, DOT: tl.constexpr):
    """acc += a @ b in fp32: both tiles cast to fp32 (ieee) if DOT_FP32, else to DOT (the
    activations' fp16/bf16, for the tensor cores: fp32 adapter weights over a bf16 base are
    rounded there, as under autocast)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a.to(DOT), b.to(DOT), acc)


# --------------------------------------------------------------------------------------------
# Shrink: (P, K) -> (P, R)
# --------------------------------------------------------------------------------------------


@triton.jit
def _shrink_kernel(
    src_ptr,  # (T, K) input rows
    rows_ptr,  # (P,) int64 source row of each pair (unused unless HAS_ROWS)
    w_ptr,  # (G, R, K) per-group weight (any strides)
    scale_ptr,  # (G,) fp32 (unused unless HAS_SCALE)
    out_ptr,  # (P, R) fp32
    tiles_ptr,  # (2, n_tiles) int32 tile table
    offsets_ptr,  # (G+1,) int64
    K,
    R,
    n_tiles,
    stride_sm,
    stride_sk,
    stride_wg,
    stride_wr,
    stride_wk,
    stride_om,
    stride_or,
    HAS_ROWS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.load(tiles_ptr + t)
    if g < 0:
        return
    start = tl.load(tiles_ptr + n_tiles + t)
    end = tl.load(offsets_ptr + g + 1)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    if HAS_ROWS:
        src_rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        src_rows = offs_m.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + g.to(tl.int64) * stride_wg
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xt = tl.load(
            src_ptr + src_rows[:, None] * stride_sm + kk[None, :] * stride_sk,
            mask=mask_m[:, None] & (kk[None, :] < K),
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        wt = tl.load(
            w_base + offs_r[None, :] * stride_wr + kk[:, None] * stride_wk,
            mask=(offs_r[None, :] < R) & (kk[:, None] < K),
            other=0.0,
        )  # (BLOCK_K, BLOCK_R)
        acc = _mma(xt, wt, acc, DOT_FP32, DOT)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + g)
    tl.store(
        out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_r[None, :] * stride_or,
        acc,
        mask=mask_m[:, None] & (offs_r[None, :] < R),
    )


def shrink(
    src: Tensor,  # (T, K)
    rows: Tensor | None,  # (P,) int64, or None: pair p reads src[p]
    w: Tensor,  # (G, R, K), any strides (a transposed view is fine)
    scale: Tensor | None,  # (G,) fp32
    offsets: Tensor,  # (G+1,) int64
    tiles: Tensor,  # (2, n_tiles) int32 from tile_table
    num_pairs: int,
) -> Tensor:
    """h[p] = scale[g] * src[rows[p]] @ w[g].T -> (P, R) fp32; 0 for pairs outside every group."""
    G, R, K = w.shape
    if src.shape[1] != K:
        raise ValueError(f"shrink: src has {src.shape[1]} features, weight expects {K}")
    # zeros, not empty: pairs outside every group must read back as 0 (their weight grads).
    out = torch.zeros(num_pairs, R, device=src.device, dtype=torch.float32)
    if num_pairs == 0 or G == 0:
        return out
    n_tiles = tiles.shape[1]
    _shrink_kernel[(n_tiles,)](
        src,
        rows if rows is not None else offsets,
        w,
        scale if scale is not None else offsets,
        out,
        tiles,
        offsets,
        K,
        R,
        n_tiles,
        src.stride(0),
        src.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        HAS_ROWS=rows is not None,
        HAS_SCALE=scale is not None,
        DOT_FP32=INTERPRET or src.dtype == torch.float32,
        DOT=_TL_DTYPE[src.dtype],
        BLOCK_M=BLOCK_M,
        BLOCK_R=_block_r(R),
        BLOCK_K=_BLOCK_K,
        num_warps=_WARPS,
        num_stages=_STAGES,
    )
    return out


# --------------------------------------------------------------------------------------------
# Expand: (P, R) -> (P, N), or scattered and added into (T, N)
# --------------------------------------------------------------------------------------------


@triton.jit
def _expand_kernel(
    h_ptr,  # (P, R) fp32 rank-space rows
    w_ptr,  # (G, N, R) per-group weight (any strides)
    scale_ptr,  # (G,) fp32 (unused unless HAS_SCALE)
    pw_ptr,  # (P,) fp32 per-pair weight (unused unless HAS_PW)
    dst_ptr,  # (P,) int64 destination row of each pair (unused unless SCATTER)
    out_ptr,  # (P, N) in the output dtype, or (T, N) fp32 when SCATTER
    tiles_ptr,  # (2, n_tiles) int32 tile table
    offsets_ptr,  # (G+1,) int64
    N,
    R,
    n_tiles,
    stride_hm,
    stride_hr,
    stride_wg,
    stride_wn,
    stride_wr,
    stride_om,
    stride_on,
    HAS_SCALE: tl.constexpr,
    HAS_PW: tl.constexpr,
    SCATTER: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(tiles_ptr + t)
    if g < 0:
        return
    start = tl.load(tiles_ptr + n_tiles + t)
    end = tl.load(offsets_ptr + g + 1)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    h = tl.load(
        h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_r[None, :] * stride_hr,
        mask=mask_m[:, None] & (offs_r[None, :] < R),
        other=0.0,
    )  # (BLOCK_M, BLOCK_R) fp32
    w = tl.load(
        w_ptr
        + g.to(tl.int64) * stride_wg
        + offs_r[:, None] * stride_wr
        + offs_n[None, :] * stride_wn,
        mask=(offs_r[:, None] < R) & mask_n[None, :],
        other=0.0,
    )  # (BLOCK_R, BLOCK_N)
    acc = _mma(h, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32, DOT)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + g)
    if HAS_PW:
        acc = acc * tl.load(pw_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    mask = mask_m[:, None] & mask_n[None, :]
    if SCATTER:
        dst = tl.load(dst_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        # fp32 adds into a zeroed buffer: with at most two pairs per row (top-2) the sum is
        # order-independent, so the result stays deterministic.
        tl.atomic_add(
            out_ptr + dst[:, None] * stride_om + offs_n[None, :] * stride_on, acc, mask=mask
        )
    else:
        tl.store(
            out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=mask,
        )


def expand(
    h: Tensor,  # (P, R) fp32
    w: Tensor,  # (G, N, R), any strides
    scale: Tensor | None,  # (G,) fp32
    offsets: Tensor,  # (G+1,) int64
    tiles: Tensor,  # (2, n_tiles) int32
    *,
    out_dtype: torch.dtype,
    pair_weight: Tensor | None = None,  # (P,) fp32
    dst: Tensor | None = None,  # (P,) int64: scatter-add pair p into row dst[p]
    num_dst: int = 0,  # T, rows of the scattered output
) -> Tensor:
    """out[p] = scale[g] * pair_weight[p] * h[p] @ w[g].T -> (P, N) in out_dtype.

    With `dst`: out (num_dst, N) fp32, out[dst[p]] += (the same), rows no pair reaches are 0.
    Without `dst`, rows of pairs outside every group are left unset.
    """
    G, N, R = w.shape
    P = h.shape[0]
    if dst is not None:
        out = torch.zeros(num_dst, N, device=h.device, dtype=torch.float32)
    else:
        out = torch.empty(P, N, device=h.device, dtype=out_dtype)
    if P == 0 or G == 0 or N == 0:
        return out
    n_tiles = tiles.shape[1]
    block_n = _BLOCK_N_ADD if dst is not None else _BLOCK_N
    grid = (n_tiles, triton.cdiv(N, block_n))
    _expand_kernel[grid](
        h,
        w,
        scale if scale is not None else offsets,
        pair_weight if pair_weight is not None else offsets,
        dst if dst is not None else offsets,
        out,
        tiles,
        offsets,
        N,
        R,
        n_tiles,
        h.stride(0),
        h.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        HAS_SCALE=scale is not None,
        HAS_PW=pair_weight is not None,
        SCATTER=dst is not None,
        DOT_FP32=INTERPRET or out_dtype == torch.float32,
        DOT=_TL_DTYPE[out_dtype],
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_R=_block_r(R),
        num_warps=_WARPS,
        num_stages=_STAGES,
    )
    return out


@triton.jit
def _zero_outside_kernel(
    out_ptr,  # (P, N)
    offsets_ptr,  # (G+1,) int64
    G,
    P,
    N,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start = tl.program_id(0) * BLOCK_M
    lo = tl.load(offsets_ptr)
    hi = tl.load(offsets_ptr + G)
    if (start >= lo) & (start + BLOCK_M <= hi):
        return  # every row of this block belongs to a group: the expand wrote it
    offs_m = start + tl.arange(0, BLOCK_M)
    outside = ((offs_m < lo) | (offs_m >= hi)) & (offs_m < P)
    zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tl.store(
            out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
            zeros,
            mask=outside[:, None] & (offs_n[None, :] < N),
        )


def zero_outside(out: Tensor, offsets: Tensor) -> Tensor:
    """Zero the rows of `out` (P, N) that lie outside every group, in place, without a sync.

    Returns `out`. Nearly free when every pair has a group: each block exits on two loads.
    """
    P, N = out.shape
    if P == 0 or N == 0:
        return out
    _zero_outside_kernel[(triton.cdiv(P, BLOCK_M),)](
        out,
        offsets,
        offsets.numel() - 1,
        P,
        N,
        out.stride(0),
        out.stride(1),
        BLOCK_M=BLOCK_M,
        BLOCK_N=_BLOCK_N,
        num_warps=_WARPS,
    )
    return out


# --------------------------------------------------------------------------------------------
# Per-group weight gradients: out[g] = s[g] * sum_{p in g} a[ra[p]].T @ b[rb[p]]
# --------------------------------------------------------------------------------------------


@triton.jit
def _seg_outer_kernel(
    a_ptr,  # (., M1) left rows
    a_rows_ptr,  # (P,) int64 (unused unless A_ROWS: pair p reads a[p])
    b_ptr,  # (., M2) right rows
    b_rows_ptr,  # (P,) int64 (unused unless B_ROWS)
    scale_ptr,  # (G,) fp32 (unused unless HAS_SCALE)
    out_ptr,  # (G, M1, M2) in the weight dtype
    offsets_ptr,  # (G+1,) int64
    M1,
    M2,
    stride_ap,
    stride_a1,
    stride_bp,
    stride_b2,
    stride_og,
    stride_o1,
    stride_o2,
    A_ROWS: tl.constexpr,
    B_ROWS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_1: tl.constexpr,
    BLOCK_2: tl.constexpr,
):
    g = tl.program_id(0)
    offs_1 = tl.program_id(1) * BLOCK_1 + tl.arange(0, BLOCK_1)
    offs_2 = tl.program_id(2) * BLOCK_2 + tl.arange(0, BLOCK_2)
    lo = tl.load(offsets_ptr + g)
    hi = tl.load(offsets_ptr + g + 1)
    acc = tl.zeros((BLOCK_1, BLOCK_2), dtype=tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    for p0 in range(lo, hi, BLOCK_P):
        pp = p0 + offs_p
        mask_p = pp < hi
        if A_ROWS:
            ra = tl.load(a_rows_ptr + pp, mask=mask_p, other=0).to(tl.int64)
        else:
            ra = pp.to(tl.int64)
        if B_ROWS:
            rb = tl.load(b_rows_ptr + pp, mask=mask_p, other=0).to(tl.int64)
        else:
            rb = pp.to(tl.int64)
        at = tl.load(
            a_ptr + ra[None, :] * stride_ap + offs_1[:, None] * stride_a1,
            mask=mask_p[None, :] & (offs_1[:, None] < M1),
            other=0.0,
        )  # (BLOCK_1, BLOCK_P)
        bt = tl.load(
            b_ptr + rb[:, None] * stride_bp + offs_2[None, :] * stride_b2,
            mask=mask_p[:, None] & (offs_2[None, :] < M2),
            other=0.0,
        )  # (BLOCK_P, BLOCK_2)
        acc = _mma(at, bt, acc, DOT_FP32, DOT)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + g)
    tl.store(
        out_ptr
        + g.to(tl.int64) * stride_og
        + offs_1[:, None] * stride_o1
        + offs_2[None, :] * stride_o2,
        acc.to(out_ptr.dtype.element_ty),
        mask=(offs_1[:, None] < M1) & (offs_2[None, :] < M2),
    )


def seg_outer(
    a: Tensor,  # (., M1)
    a_rows: Tensor | None,  # (P,) int64 or None
    b: Tensor,  # (., M2)
    b_rows: Tensor | None,  # (P,) int64 or None
    scale: Tensor | None,  # (G,) fp32
    offsets: Tensor,  # (G+1,) int64
    out_dtype: torch.dtype,
    compute: torch.dtype,  # the activations' dtype: the dot runs in it
) -> Tensor:
    """out[g] = scale[g] * sum over pairs p of group g of a[a_rows[p]].T @ b[b_rows[p]].

    Returns: (G, M1, M2) in out_dtype; empty groups give zeros. No atomics.
    """
    G = offsets.numel() - 1
    M1, M2 = a.shape[1], b.shape[1]
    out = torch.empty(G, M1, M2, device=a.device, dtype=out_dtype)
    if G == 0 or M1 == 0 or M2 == 0:
        return out
    # The narrow side (the rank) is one whole block; the wide side (features) is tiled.
    b1 = _block_r(M1) if M1 <= 64 else _BLOCK_F
    b2 = _block_r(M2) if M2 <= 64 else _BLOCK_F
    grid = (G, triton.cdiv(M1, b1), triton.cdiv(M2, b2))
    _seg_outer_kernel[grid](
        a,
        a_rows if a_rows is not None else offsets,
        b,
        b_rows if b_rows is not None else offsets,
        scale if scale is not None else offsets,
        out,
        offsets,
        M1,
        M2,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        A_ROWS=a_rows is not None,
        B_ROWS=b_rows is not None,
        HAS_SCALE=scale is not None,
        DOT_FP32=INTERPRET or compute == torch.float32,
        DOT=_TL_DTYPE[compute],
        BLOCK_P=_BLOCK_P,
        BLOCK_1=b1,
        BLOCK_2=b2,
        num_warps=_WARPS,
        num_stages=_STAGES,
    )
    return out


# --------------------------------------------------------------------------------------------
# Autograd Functions
# --------------------------------------------------------------------------------------------


def _t(w: Tensor) -> Tensor:
    """(G, a, b) -> (G, b, a) view: the kernels take any strides, so no copy."""
    return w.transpose(1, 2)


class LoraSegmentsFn(torch.autograd.Function):
    """y[p] = scale[g] * (x[rows[p]] @ A[g].T) @ B[g].T; grads for x, A, B."""

    @staticmethod
    def forward(ctx, x, A, B, scale, offsets, rows, tiles):  # type: ignore[override]
        P = rows.numel() if rows is not None else x.shape[0]
        h = shrink(x, rows, A, None, offsets, tiles, P)  # (P, R) fp32
        y = expand(h, B, scale, offsets, tiles, out_dtype=x.dtype)  # (P, N)
        zero_outside(y, offsets)  # pairs outside every group (group -1) read 0
        ctx.save_for_backward(x, A, B, scale, offsets, rows, tiles, h)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, A, B, scale, offsets, rows, tiles, h = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        P = h.shape[0]
        dx = dA = dB = None
        if need_b:
            dB = seg_outer(dy, None, h, None, scale, offsets, B.dtype, x.dtype)  # (G, N, R)
        if need_x or need_a:
            dh = shrink(dy, None, _t(B), scale, offsets, tiles, P)  # (P, R) = s * dy @ B[g]
            if need_a:
                dA = seg_outer(dh, None, x, rows, None, offsets, A.dtype, x.dtype)  # (G, R, H)
            if need_x:
                dx = _scatter_rows(dh, A, offsets, tiles, rows, x)
        return dx, dA, dB, None, None, None, None


def _scatter_rows(dh: Tensor, A: Tensor, offsets: Tensor, tiles: Tensor, rows, x: Tensor):
    """dx[rows[p]] += dh[p] @ A[g] -> (T, H) in x's dtype; rows None: dx[p] = dh[p] @ A[g]
    (0 for pairs outside every group)."""
    if rows is None:
        dx = expand(dh, _t(A), None, offsets, tiles, out_dtype=x.dtype)  # (T, H)
        return zero_outside(dx, offsets)
    dx = expand(dh, _t(A), None, offsets, tiles, out_dtype=x.dtype, dst=rows, num_dst=x.shape[0])
    return dx.to(x.dtype)


class LoraCombineFn(torch.autograd.Function):
    """out[dst[p]] += weights[p] * scale[g] * (x[rows[p]] @ A[g].T) @ B[g].T; grads for x, A,
    B and weights."""

    @staticmethod
    def forward(ctx, x, A, B, scale, offsets, weights, dst, num_rows, rows, tiles):  # type: ignore[override]
        P = dst.numel()
        w = weights.float()
        h = shrink(x, rows, A, None, offsets, tiles, P)  # (P, R) fp32
        out = expand(
            h, B, scale, offsets, tiles, out_dtype=x.dtype, pair_weight=w, dst=dst, num_dst=num_rows
        )  # (T_out, N) fp32
        ctx.save_for_backward(x, A, B, scale, offsets, w, dst, rows, tiles, h)
        ctx.weights_dtype = weights.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        x, A, B, scale, offsets, w, dst, rows, tiles, h = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        need_w = ctx.needs_input_grad[5]
        P = h.shape[0]
        dx = dA = dB = dw = None
        if need_b:
            hw = h * w[:, None]  # (P, R)
            dB = seg_outer(dout, dst, hw, None, scale, offsets, B.dtype, x.dtype)  # (G, N, R)
        if need_x or need_a or need_w:
            dhu = shrink(dout, dst, _t(B), scale, offsets, tiles, P)  # (P, R) s*dout[dst]@B[g]
            if need_w:
                dw = (dhu * h).sum(1).to(ctx.weights_dtype)  # (P,)
            dh = dhu * w[:, None]  # (P, R)
            if need_a:
                dA = seg_outer(dh, None, x, rows, None, offsets, A.dtype, x.dtype)  # (G, R, H)
            if need_x:
                dx = _scatter_rows(dh, A, offsets, tiles, rows, x)
        return dx, dA, dB, None, None, dw, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public functions (called through mixloom.kernels)
# --------------------------------------------------------------------------------------------


def _check_tiles(tiles: Tensor, num_pairs: int, G: int) -> None:
    if tiles.shape != (2, triton.cdiv(num_pairs, BLOCK_M) + G):
        raise ValueError(
            f"tile table of shape {tuple(tiles.shape)} was not built for {num_pairs} pairs, "
            f"{G} groups and {BLOCK_M}-pair tiles: build it with build_routing(..., "
            "with_tiles=True) or tile_table() after TRITON_INTERPRET is settled"
        )


def _check(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, offsets: Tensor) -> None:
    _check_device(x, A, B, scale, offsets)
    G, R, H = A.shape
    if x.shape[1] != H or B.shape[0] != G or B.shape[2] != R:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, A {tuple(A.shape)} (G, R, H), "
            f"B {tuple(B.shape)} (G, N, R)"
        )
    if scale.shape != (G,) or offsets.shape != (G + 1,):
        raise ValueError(
            f"scale must be ({G},) and offsets ({G + 1},); got "
            f"{tuple(scale.shape)} and {tuple(offsets.shape)}"
        )


def lora_segments(
    x: Tensor,  # (T, H)
    A: Tensor,  # (G, R, H)
    B: Tensor,  # (G, N, R)
    scale: Tensor,  # (G,) fp32
    offsets: Tensor,  # (G+1,) int64, on x.device
    rows: Tensor | None = None,  # (P,) int64 or None (P == T)
    tiles: Tensor | None = None,  # (2, n_tiles) int32 from routing.tile_table, or None
) -> Tensor:
    """Triton path of mixloom.kernels.lora_segments -> (P, N) in x's dtype."""
    _check(x, A, B, scale, offsets)
    P = rows.numel() if rows is not None else x.shape[0]
    if tiles is None:
        tiles = tile_table(offsets, P, BLOCK_M)
    _check_tiles(tiles, P, A.shape[0])
    return LoraSegmentsFn.apply(x, A, B, scale.float(), offsets, rows, tiles)


def lora_combine(
    x: Tensor,  # (T_in, H)
    A: Tensor,  # (G, R, H)
    B: Tensor,  # (G, N, R)
    scale: Tensor,  # (G,) fp32
    offsets: Tensor,  # (G+1,) int64
    weights: Tensor,  # (P,) per-pair weight (routing weight)
    dst: Tensor,  # (P,) int64 output row of each pair
    num_rows: int,  # T_out
    rows: Tensor | None = None,  # (P,) int64 input row of each pair, or None (x is per pair)
    tiles: Tensor | None = None,
) -> Tensor:
    """Triton path of mixloom.kernels.lora_combine -> (T_out, N) in x's dtype."""
    _check(x, A, B, scale, offsets)
    if tiles is None:
        tiles = tile_table(offsets, dst.numel(), BLOCK_M)
    _check_tiles(tiles, dst.numel(), A.shape[0])
    return LoraCombineFn.apply(x, A, B, scale.float(), offsets, weights, dst, num_rows, rows, tiles)
