"""Fused MixLoRA expert gate/up: per pair p of group g (token t = rows[p]),

    g_p = gate[t] + s_g[g] * (x_gate[p] @ A_g[g].T) @ B_g[g].T       (I,)
    u_p = up[t]   + s_u[g] * (x_up[p]   @ A_u[g].T) @ B_u[g].T       (I,)
    z_p = silu(g_p) * u_p                                           (I,)  the down LoRA's input
    zsum[t] += w_p * z_p                                            (I,)  the frozen down's input

`gate`/`up` are the frozen projections of every token, computed once per token; the LoRA
deltas, the SiLU*up epilogue, the routing weight and the per-token sum happen in one pass over
(P, I) tiles, where the unfused path writes and re-reads g, u, z and w*z. The backward
recomputes g and u from the saved rank-space rows (P, R) instead of storing them.

Layers: `_glu_fwd_kernel`/`_glu_bwd_kernel` + launchers -> `ExpertGluFn` -> `expert_glu`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mixloom.kernels.segmented import (
    _STAGES,
    _TL_DTYPE,
    BLOCK_M,
    INTERPRET,
    _block_r,
    _check_device,
    _check_tiles,
    _knob,
    _mma,
    _scatter_rows,
    _t,
    seg_outer,
    shrink,
    tile_table,
    zero_outside,
)

# Register budget, not measured yet: the forward keeps ~5 and the backward ~8 (BLOCK_M, BLOCK_N)
# fp32 tiles live; at 64 x 128 and 4 warps one tile is 64 registers a thread, so 8 warps, and
# 64 columns in the backward, keep them under 255 instead of spilling.
_GLU_WARPS = _knob("GLU_WARPS", 4, 8)
_GLU_BLOCK_N_FWD = _knob("GLU_BLOCK_N_FWD", 32, 128)
_GLU_BLOCK_N_BWD = _knob("GLU_BLOCK_N_BWD", 32, 64)


@triton.jit
def _lora_tile(h_ptr, w_ptr, g, offs_m, mask_m, offs_n, mask_n, R, stride_hm, stride_wg,
               stride_wn, stride_wr, DOT_FP32: tl.constexpr, DOT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """(BLOCK_M, BLOCK_N) fp32 tile of h[offs_m] @ w[g, offs_n].T (h: (P, R) fp32, unit
    stride along R)."""
    offs_r = tl.arange(0, BLOCK_R)
    h = tl.load(
        h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_r[None, :],
        mask=mask_m[:, None] & (offs_r[None, :] < R),
        other=0.0,
    )
    w = tl.load(
        w_ptr
        + g.to(tl.int64) * stride_wg
        + offs_r[:, None] * stride_wr
        + offs_n[None, :] * stride_wn,
        mask=(offs_r[:, None] < R) & mask_n[None, :],
        other=0.0,
    )
    return _mma(h, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32, DOT)


@triton.jit
def _glu_fwd_kernel(
    hg_ptr,  # (P, R) fp32 x_gate @ A_g.T
    hu_ptr,  # (P, R) fp32 x_up @ A_u.T
    bg_ptr,  # (G, I, R) B_g
    bu_ptr,  # (G, I, R) B_u
    sg_ptr,  # (G,) fp32
    su_ptr,  # (G,) fp32
    gate_ptr,  # (T, I) frozen gate of every token
    up_ptr,  # (T, I) frozen up of every token
    rows_ptr,  # (P,) int64 token of each pair
    w_ptr,  # (P,) fp32 routing weight
    z_ptr,  # (P, I) out, gate's dtype
    zsum_ptr,  # (T, I) out, fp32, zeroed
    tiles_ptr,  # (2, n_tiles) int32
    offsets_ptr,  # (G+1,) int64
    n_inter,
    R,
    n_tiles,
    stride_hm,
    stride_bg,
    stride_bn,
    stride_br,
    stride_tm,  # gate/up row stride (unit column stride)
    stride_zm,  # z and zsum row stride (unit column stride)
    DOT_FP32: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.load(tiles_ptr + t)
    if g < 0:
        return
    start = tl.load(tiles_ptr + n_tiles + t)
    end = tl.load(offsets_ptr + g + 1)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_inter
    mask = mask_m[:, None] & mask_n[None, :]
    tok = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    gv = _lora_tile(hg_ptr, bg_ptr, g, offs_m, mask_m, offs_n, mask_n, R, stride_hm, stride_bg,
                    stride_bn, stride_br, DOT_FP32, DOT, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip
    uv = _lora_tile(hu_ptr, bu_ptr, g, offs_m, mask_m, offs_n, mask_n, R, stride_hm, stride_bg,
                    stride_bn, stride_br, DOT_FP32, DOT, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip
    base = tok[:, None] * stride_tm + offs_n[None, :]
    gv = gv * tl.load(sg_ptr + g) + tl.load(gate_ptr + base, mask=mask, other=0.0).to(tl.float32)
    uv = uv * tl.load(su_ptr + g) + tl.load(up_ptr + base, mask=mask, other=0.0).to(tl.float32)
    z = gv * tl.sigmoid(gv) * uv  # (BLOCK_M, BLOCK_N) fp32
    tl.store(
        z_ptr + offs_m.to(tl.int64)[:, None] * stride_zm + offs_n[None, :],
        z.to(z_ptr.dtype.element_ty),
        mask=mask,
    )
    w = tl.load(w_ptr + offs_m, mask=mask_m, other=0.0)
    # At most top-k adds per token row; with k <= 2 the fp32 sum is order-independent.
    tl.atomic_add(zsum_ptr + tok[:, None] * stride_zm + offs_n[None, :], z * w[:, None], mask=mask)


@triton.jit
def _glu_bwd_kernel(
    hg_ptr,  # (P, R) fp32
    hu_ptr,  # (P, R) fp32
    bg_ptr,  # (G, I, R)
    bu_ptr,  # (G, I, R)
    sg_ptr,  # (G,) fp32
    su_ptr,  # (G,) fp32
    gate_ptr,  # (T, I)
    up_ptr,  # (T, I)
    rows_ptr,  # (P,) int64
    w_ptr,  # (P,) fp32
    dz_ptr,  # (P, I) grad of z
    dzsum_ptr,  # (T, I) grad of zsum
    dg_ptr,  # (P, I) out: grad of g_p, gate's dtype
    du_ptr,  # (P, I) out: grad of u_p
    dgate_ptr,  # (T, I) out, fp32, zeroed: grad of gate (sum over the token's pairs)
    dup_ptr,  # (T, I) out, fp32, zeroed
    dw_part_ptr,  # (P, n_col_blocks) out, fp32: this column block's share of dL/dw_p
    tiles_ptr,
    offsets_ptr,
    n_inter,
    R,
    n_tiles,
    stride_hm,
    stride_bg,
    stride_bn,
    stride_br,
    stride_tm,  # gate/up/dzsum/dgate/dup row stride
    stride_zm,  # z-like (P, I) row stride: dz, dg, du
    stride_wp,  # dw_part row stride
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
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_inter
    mask = mask_m[:, None] & mask_n[None, :]
    tok = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    gv = _lora_tile(hg_ptr, bg_ptr, g, offs_m, mask_m, offs_n, mask_n, R, stride_hm, stride_bg,
                    stride_bn, stride_br, DOT_FP32, DOT, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip
    uv = _lora_tile(hu_ptr, bu_ptr, g, offs_m, mask_m, offs_n, mask_n, R, stride_hm, stride_bg,
                    stride_bn, stride_br, DOT_FP32, DOT, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip
    tbase = tok[:, None] * stride_tm + offs_n[None, :]
    pbase = offs_m.to(tl.int64)[:, None] * stride_zm + offs_n[None, :]
    gv = gv * tl.load(sg_ptr + g) + tl.load(gate_ptr + tbase, mask=mask, other=0.0).to(tl.float32)
    uv = uv * tl.load(su_ptr + g) + tl.load(up_ptr + tbase, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gv)
    act = gv * sig
    w = tl.load(w_ptr + offs_m, mask=mask_m, other=0.0)
    dzsum = tl.load(dzsum_ptr + tbase, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(dz_ptr + pbase, mask=mask, other=0.0).to(tl.float32) + w[:, None] * dzsum
    dg = dz * uv * sig * (1.0 + gv * (1.0 - sig))  # silu'(g) = s(g) * (1 + g * (1 - s(g)))
    du = dz * act
    tl.store(dg_ptr + pbase, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + pbase, du.to(du_ptr.dtype.element_ty), mask=mask)
    tl.atomic_add(dgate_ptr + tbase, dg, mask=mask)
    tl.atomic_add(dup_ptr + tbase, du, mask=mask)
    dw = tl.sum(tl.where(mask, dzsum * act * uv, 0.0), axis=1)  # (BLOCK_M,)
    tl.store(dw_part_ptr + offs_m.to(tl.int64) * stride_wp + pid_n, dw, mask=mask_m)


def _common(Bg, gate, tiles, block_n: int) -> tuple[tuple[int, int], dict]:
    grid = (tiles.shape[1], triton.cdiv(Bg.shape[1], block_n))
    meta = dict(
        DOT_FP32=INTERPRET or gate.dtype == torch.float32,
        DOT=_TL_DTYPE[gate.dtype],
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_R=_block_r(Bg.shape[2]),
        num_warps=_GLU_WARPS,
        num_stages=_STAGES,
    )
    return grid, meta


def glu_forward(hg, hu, Bg, Bu, sg, su, gate, up, rows, w, offsets, tiles):
    """Launcher: -> z (P, I) in gate's dtype, zsum (T, I) fp32."""
    P, (T, n_inter) = rows.numel(), gate.shape
    z = torch.empty(P, n_inter, device=gate.device, dtype=gate.dtype)
    zsum = torch.zeros(T, n_inter, device=gate.device, dtype=torch.float32)
    if P and n_inter and Bg.shape[0]:
        grid, meta = _common(Bg, gate, tiles, _GLU_BLOCK_N_FWD)
        _glu_fwd_kernel[grid](
            hg, hu, Bg, Bu, sg, su, gate, up, rows, w, z, zsum, tiles, offsets,
            n_inter, Bg.shape[2], tiles.shape[1], hg.stride(0), Bg.stride(0), Bg.stride(1),
            Bg.stride(2), gate.stride(0), z.stride(0), **meta,
        )  # fmt: skip
    return zero_outside(z, offsets), zsum


def glu_backward(hg, hu, Bg, Bu, sg, su, gate, up, rows, w, dz, dzsum, offsets, tiles):
    """Launcher: -> dg, du (P, I) in gate's dtype; dgate, dup (T, I) fp32; dw (P,) fp32."""
    P, (T, n_inter) = rows.numel(), gate.shape
    # rows of pairs outside every group stay unset: nothing downstream reads them
    dg = torch.empty(P, n_inter, device=gate.device, dtype=gate.dtype)
    du = torch.empty_like(dg)
    dgate = torch.zeros(T, n_inter, device=gate.device, dtype=torch.float32)
    dup = torch.zeros_like(dgate)
    n_col = triton.cdiv(n_inter, _GLU_BLOCK_N_BWD)
    dw_part = torch.zeros(P, n_col, device=gate.device, dtype=torch.float32)
    if P and n_inter and Bg.shape[0]:
        grid, meta = _common(Bg, gate, tiles, _GLU_BLOCK_N_BWD)
        _glu_bwd_kernel[grid](
            hg, hu, Bg, Bu, sg, su, gate, up, rows, w, dz, dzsum, dg, du, dgate, dup, dw_part,
            tiles, offsets, n_inter, Bg.shape[2], tiles.shape[1], hg.stride(0), Bg.stride(0),
            Bg.stride(1), Bg.stride(2), gate.stride(0), dg.stride(0), dw_part.stride(0),
            **meta,
        )  # fmt: skip
    return dg, du, dgate, dup, dw_part.sum(1)


class ExpertGluFn(torch.autograd.Function):
    """(z, zsum) of expert_glu; grads for x_gate, x_up, gate, up, A_g, B_g, A_u, B_u, w."""

    @staticmethod
    def forward(ctx, x_gate, x_up, gate, up, Ag, Bg, Au, Bu, sg, su, offsets, rows, w, x_rows,
                tiles):  # type: ignore[override]  # fmt: skip
        P = rows.numel()
        # The kernels share one row stride between gate, up and their grads: contiguous.
        gate, up = gate.contiguous(), up.contiguous()
        wf = w.float()
        hg = shrink(x_gate, x_rows, Ag, None, offsets, tiles, P)  # (P, R) fp32
        hu = shrink(x_up, x_rows, Au, None, offsets, tiles, P)  # (P, R) fp32
        z, zsum = glu_forward(hg, hu, Bg, Bu, sg, su, gate, up, rows, wf, offsets, tiles)
        ctx.save_for_backward(x_gate, x_up, gate, up, Ag, Bg, Au, Bu, sg, su, offsets, rows, wf,
                              x_rows, tiles, hg, hu)  # fmt: skip
        ctx.w_dtype = w.dtype
        return z, zsum.to(gate.dtype)

    @staticmethod
    def backward(ctx, dz, dzsum):  # type: ignore[override]
        (x_gate, x_up, gate, up, Ag, Bg, Au, Bu, sg, su, offsets, rows, wf, x_rows, tiles, hg,
         hu) = ctx.saved_tensors  # fmt: skip
        P = rows.numel()
        dz = gate.new_zeros(P, gate.shape[1]) if dz is None else dz.contiguous()
        dzsum = torch.zeros_like(gate) if dzsum is None else dzsum.contiguous()
        dg, du, dgate, dup, dw = glu_backward(
            hg, hu, Bg, Bu, sg, su, gate, up, rows, wf, dz, dzsum, offsets, tiles
        )
        grads = []
        for x, A, B, s, d, h in ((x_gate, Ag, Bg, sg, dg, hg), (x_up, Au, Bu, su, du, hu)):
            dB = seg_outer(d, None, h, None, s, offsets, B.dtype, gate.dtype)  # (G, I, R)
            dh = shrink(d, None, _t(B), s, offsets, tiles, P)  # (P, R)
            dA = seg_outer(dh, None, x, x_rows, None, offsets, A.dtype, gate.dtype)  # (G, R, H)
            dx = _scatter_rows(dh, A, offsets, tiles, x_rows, x)
            grads.append((dx, dA, dB))
        (dxg, dAg, dBg), (dxu, dAu, dBu) = grads
        return (dxg, dxu, dgate.to(gate.dtype), dup.to(up.dtype), dAg, dBg, dAu, dBu,
                None, None, None, None, dw.to(ctx.w_dtype), None, None)  # fmt: skip


def expert_glu(
    x_gate: Tensor,  # (T_in, H)
    x_up: Tensor,  # (T_in, H)
    gate: Tensor,  # (T, I)
    up: Tensor,  # (T, I)
    A_gate: Tensor,  # (G, R, H)
    B_gate: Tensor,  # (G, I, R)
    A_up: Tensor,  # (G, R, H)
    B_up: Tensor,  # (G, I, R)
    scale_gate: Tensor,  # (G,) fp32
    scale_up: Tensor,  # (G,) fp32
    offsets: Tensor,  # (G+1,) int64
    rows: Tensor,  # (P,) int64
    weights: Tensor,  # (P,)
    x_rows: Tensor | None = None,
    tiles: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton path of mixloom.kernels.expert_glu -> (z (P, I), zsum (T, I)) in gate's dtype."""
    _check_device(x_gate, x_up, gate, up, A_gate, B_gate, A_up, B_up, offsets, rows)
    G, R, H = A_gate.shape
    n_inter = gate.shape[1]
    for name, t, shape in (
        ("A_up", A_up, (G, R, H)),
        ("B_gate", B_gate, (G, n_inter, R)),
        ("B_up", B_up, (G, n_inter, R)),
        ("up", up, tuple(gate.shape)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"expert_glu: {name} has shape {tuple(t.shape)}, expected {shape}")
    P = rows.numel()
    if tiles is None:
        tiles = tile_table(offsets, P, BLOCK_M)
    _check_tiles(tiles, P, G)
    return ExpertGluFn.apply(
        x_gate, x_up, gate, up, A_gate, B_gate, A_up, B_up, scale_gate.float(),
        scale_up.float(), offsets, rows, weights, x_rows, tiles,
    )  # fmt: skip
