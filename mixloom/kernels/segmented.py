"""Segmented (multi-job, multi-expert) LoRA matmuls in Triton.

Three kernels cover the forward and backward of every grouped LoRA product:
- `_shrink_kernel`: out[p] = s[g] * src[rows[p]] @ W[g].T   (P, K) -> (P, R), gathered rows
- `_expand_kernel`: out[p] (or out[dst[p]] +=) = s[g] * w[p] * h[p] @ W[g].T   (P, R) -> (P, N)
- `_seg_outer_kernel`: out[g] = s[g] * sum_{p in g} a[ra[p]].T @ b[rb[p]]   per-group weight
  gradients; one program owns one output tile of one group and loops over that group's pairs,
  so no atomics and a deterministic result.
- `_zero_outside_kernel`: zeroes rows of pairs that belong to no group (group_pairs' -1).

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
Every launcher takes the batch's GroupedPairs (offsets, tile table, pair count) as one object.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mixloom.kernels import common
from mixloom.kernels.common import expand_tile, mma, tile_pairs
from mixloom.kernels.pairs import GroupedPairs, LoraStack

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
    g, offs_m, mask_m = tile_pairs(tiles_ptr, offsets_ptr, n_tiles, BLOCK_M)
    if g < 0:
        return
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
        acc = mma(xt, wt, acc, DOT_FP32, DOT)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + g)
    tl.store(
        out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_r[None, :] * stride_or,
        acc,
        mask=mask_m[:, None] & (offs_r[None, :] < R),
    )


def shrink(
    src: Tensor,  # (T, K), or (P, K) when rows is None
    w: Tensor,  # (G, R, K), any strides (a transposed view is fine)
    pairs: GroupedPairs,  # with its tile table
    *,
    rows: Tensor | None = None,  # (P,) int64: pair p reads src[rows[p]]; None: src[p]
    scale: Tensor | None = None,  # (G,) fp32
) -> Tensor:
    """h[p] = scale[g] * src[rows[p]] @ w[g].T -> (P, R) fp32; 0 for pairs outside every group."""
    G, R, K = w.shape
    if src.shape[1] != K:
        raise ValueError(f"shrink: src has {src.shape[1]} features, weight expects {K}")
    # zeros, not empty: pairs outside every group must read back as 0 (their weight grads).
    out = torch.zeros(pairs.num_pairs, R, device=src.device, dtype=torch.float32)
    if pairs.num_pairs == 0 or G == 0:
        return out
    t = common.tiles()
    tile_table = pairs.tiles
    assert tile_table is not None
    n_tiles = tile_table.shape[1]
    _shrink_kernel[(n_tiles,)](
        src,
        rows if rows is not None else pairs.offsets,
        w,
        scale if scale is not None else pairs.offsets,
        out,
        tile_table,
        pairs.offsets,
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
        **common.dot_options(src.dtype),
        BLOCK_M=t.block_m,
        BLOCK_R=common.block_r(R),
        BLOCK_K=t.block_k,
        num_warps=t.warps,
        num_stages=t.stages,
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
    g, offs_m, mask_m = tile_pairs(tiles_ptr, offsets_ptr, n_tiles, BLOCK_M)
    if g < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = expand_tile(h_ptr, w_ptr, g, offs_m, mask_m, offs_n, mask_n, R, stride_hm, stride_hr,
                      stride_wg, stride_wn, stride_wr, DOT_FP32, DOT, BLOCK_M, BLOCK_N,
                      BLOCK_R)  # fmt: skip
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
    pairs: GroupedPairs,  # with its tile table
    *,
    out_dtype: torch.dtype,
    scale: Tensor | None = None,  # (G,) fp32
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
    t = common.tiles()
    tile_table = pairs.tiles
    assert tile_table is not None
    n_tiles = tile_table.shape[1]
    block_n = t.block_n_add if dst is not None else t.block_n
    _expand_kernel[(n_tiles, triton.cdiv(N, block_n))](
        h,
        w,
        scale if scale is not None else pairs.offsets,
        pair_weight if pair_weight is not None else pairs.offsets,
        dst if dst is not None else pairs.offsets,
        out,
        tile_table,
        pairs.offsets,
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
        **common.dot_options(out_dtype),
        BLOCK_M=t.block_m,
        BLOCK_N=block_n,
        BLOCK_R=common.block_r(R),
        num_warps=t.warps,
        num_stages=t.stages,
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


def zero_outside(out: Tensor, pairs: GroupedPairs) -> Tensor:
    """Zero the rows of `out` (P, N) that lie outside every group, in place, without a sync.

    Returns `out`. Nearly free when every pair has a group: each block exits on two loads.
    """
    P, N = out.shape
    if P == 0 or N == 0:
        return out
    t = common.tiles()
    _zero_outside_kernel[(triton.cdiv(P, t.block_m),)](
        out,
        pairs.offsets,
        pairs.num_groups,
        P,
        N,
        out.stride(0),
        out.stride(1),
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        num_warps=t.warps,
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
        acc = mma(at, bt, acc, DOT_FP32, DOT)
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
    b: Tensor,  # (., M2)
    pairs: GroupedPairs,
    *,
    out_dtype: torch.dtype,
    compute: torch.dtype,  # the activations' dtype: the dot runs in it
    a_rows: Tensor | None = None,  # (P,) int64: pair p reads a[a_rows[p]]; None: a[p]
    b_rows: Tensor | None = None,  # (P,) int64, likewise for b
    scale: Tensor | None = None,  # (G,) fp32
) -> Tensor:
    """out[g] = scale[g] * sum over pairs p of group g of a[a_rows[p]].T @ b[b_rows[p]].

    Returns: (G, M1, M2) in out_dtype; empty groups give zeros. No atomics.
    """
    G = pairs.num_groups
    M1, M2 = a.shape[1], b.shape[1]
    out = torch.empty(G, M1, M2, device=a.device, dtype=out_dtype)
    if G == 0 or M1 == 0 or M2 == 0:
        return out
    t = common.tiles()
    # The narrow side (the rank) is one whole block; the wide side (features) is tiled.
    b1 = common.block_r(M1) if M1 <= 64 else t.block_f
    b2 = common.block_r(M2) if M2 <= 64 else t.block_f
    offsets = pairs.offsets
    _seg_outer_kernel[(G, triton.cdiv(M1, b1), triton.cdiv(M2, b2))](
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
        **common.dot_options(compute),
        BLOCK_P=t.block_p,
        BLOCK_1=b1,
        BLOCK_2=b2,
        num_warps=t.warps,
        num_stages=t.stages,
    )
    return out


# --------------------------------------------------------------------------------------------
# Autograd Functions
# --------------------------------------------------------------------------------------------


def _t(w: Tensor) -> Tensor:
    """(G, a, b) -> (G, b, a) view: the kernels take any strides, so no copy."""
    return w.transpose(1, 2)


def lora_backward(
    d: Tensor,  # (P, N) dL/dy of each pair
    h: Tensor,  # (P, R) fp32 the forward's shrink, x[rows[p]] @ A[g].T
    x: Tensor,  # the forward's input
    A: Tensor,  # (G, R, H)
    B: Tensor,  # (G, N, R)
    scale: Tensor,  # (G,) fp32
    pairs: GroupedPairs,
    x_rows: Tensor | None,  # (P,) rows of x the forward gathered, or None (x per pair)
    needs: tuple[bool, bool, bool],  # dx, dA, dB wanted
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """dx, dA, dB of y[p] = scale[g] * h[p] @ B[g].T, given dL/dy = d (the shared backward of
    lora_segments and of each projection of expert_glu)."""
    need_x, need_a, need_b = needs
    dx = dA = dB = None
    if need_b:
        dB = seg_outer(d, h, pairs, out_dtype=B.dtype, compute=x.dtype, scale=scale)  # (G, N, R)
    if need_x or need_a:
        dh = shrink(d, _t(B), pairs, scale=scale)  # (P, R) = s * d @ B[g]
        if need_a:
            dA = seg_outer(dh, x, pairs, out_dtype=A.dtype, compute=x.dtype, b_rows=x_rows)
        if need_x:
            dx = scatter_rows(dh, A, pairs, x_rows, x)
    return dx, dA, dB


def scatter_rows(
    dh: Tensor, A: Tensor, pairs: GroupedPairs, rows: Tensor | None, x: Tensor
) -> Tensor:
    """dx[rows[p]] += dh[p] @ A[g] -> (T, H) in x's dtype; rows None: dx[p] = dh[p] @ A[g]
    (0 for pairs outside every group)."""
    if rows is None:
        return zero_outside(expand(dh, _t(A), pairs, out_dtype=x.dtype), pairs)  # (P, H)
    dx = expand(dh, _t(A), pairs, out_dtype=x.dtype, dst=rows, num_dst=x.shape[0])
    return dx.to(x.dtype)


class LoraSegmentsFn(torch.autograd.Function):
    """y[p] = scale[g] * (x[rows[p]] @ A[g].T) @ B[g].T; grads for x, A, B."""

    @staticmethod
    def forward(ctx, x, A, B, scale, pairs, x_rows):  # type: ignore[override]
        h = shrink(x, A, pairs, rows=x_rows)  # (P, R) fp32
        y = expand(h, B, pairs, out_dtype=x.dtype, scale=scale)  # (P, N)
        zero_outside(y, pairs)  # pairs outside every group (group -1) read 0
        ctx.save_for_backward(x, A, B, scale, h)
        ctx.pairs, ctx.x_rows = pairs, x_rows
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, A, B, scale, h = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        return (
            *lora_backward(dy, h, x, A, B, scale, ctx.pairs, ctx.x_rows, needs),
            None,
            None,
            None,
        )


class LoraCombineFn(torch.autograd.Function):
    """out[rows[p]] += weights[p] * scale[g] * (x[x_rows[p]] @ A[g].T) @ B[g].T; grads for x,
    A, B and weights."""

    @staticmethod
    def forward(ctx, x, A, B, scale, weights, pairs, x_rows, num_rows):  # type: ignore[override]
        w = weights.float()
        h = shrink(x, A, pairs, rows=x_rows)  # (P, R) fp32
        out = expand(
            h, B, pairs, out_dtype=x.dtype, scale=scale, pair_weight=w, dst=pairs.rows,
            num_dst=num_rows,
        )  # fmt: skip  # (T_out, N) fp32
        ctx.save_for_backward(x, A, B, scale, w, h)
        ctx.pairs, ctx.x_rows = pairs, x_rows
        ctx.weights_dtype = weights.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        x, A, B, scale, w, h = ctx.saved_tensors
        pairs = ctx.pairs
        need_x, need_a, need_b, _, need_w = ctx.needs_input_grad[:5]
        dx = dA = dB = dw = None
        if need_b:
            hw = h * w[:, None]  # (P, R)
            dB = seg_outer(
                dout, hw, pairs, out_dtype=B.dtype, compute=x.dtype, a_rows=pairs.rows,
                scale=scale,
            )  # fmt: skip  # (G, N, R)
        if need_x or need_a or need_w:
            dhu = shrink(dout, _t(B), pairs, rows=pairs.rows, scale=scale)  # s*dout[dst]@B[g]
            if need_w:
                dw = (dhu * h).sum(1).to(ctx.weights_dtype)  # (P,)
            dh = dhu * w[:, None]  # (P, R)
            if need_a:
                dA = seg_outer(dh, x, pairs, out_dtype=A.dtype, compute=x.dtype, b_rows=ctx.x_rows)
            if need_x:
                dx = scatter_rows(dh, A, pairs, ctx.x_rows, x)
        return dx, dA, dB, None, dw, None, None, None


# --------------------------------------------------------------------------------------------
# Public functions (called through mixloom.kernels, which checks the pairs)
# --------------------------------------------------------------------------------------------


def check(x: Tensor, lora: LoraStack, pairs: GroupedPairs) -> GroupedPairs:
    """Devices and shapes of one projection's inputs; returns `pairs` with a tile table."""
    A, B, scale = lora
    common.check_device(x, A, B, scale, pairs.offsets)
    G, R, H = A.shape
    if x.shape[1] != H or B.shape[0] != G or B.shape[2] != R:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, A {tuple(A.shape)} (G, R, H), "
            f"B {tuple(B.shape)} (G, N, R)"
        )
    if scale.shape != (G,) or pairs.num_groups != G:
        raise ValueError(
            f"scale must be ({G},) and the pairs in {G} groups; got {tuple(scale.shape)} and "
            f"{pairs.num_groups} groups"
        )
    return common.with_tiles(pairs)


def lora_segments(
    x: Tensor, lora: LoraStack, pairs: GroupedPairs, x_rows: Tensor | None = None
) -> Tensor:
    """Triton path of mixloom.kernels.lora_segments -> (P, N) in x's dtype."""
    pairs = check(x, lora, pairs)
    return LoraSegmentsFn.apply(x, lora.A, lora.B, lora.scale.float(), pairs, x_rows)


def lora_combine(
    x: Tensor, lora: LoraStack, pairs: GroupedPairs, num_rows: int, x_rows: Tensor | None = None
) -> Tensor:
    """Triton path of mixloom.kernels.lora_combine -> (num_rows, N) in x's dtype."""
    pairs = check(x, lora, pairs)
    A, B, scale = lora
    return LoraCombineFn.apply(x, A, B, scale.float(), pairs.weights, pairs, x_rows, num_rows)
