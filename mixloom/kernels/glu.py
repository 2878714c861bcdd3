"""Fused MixLoRA expert gate/up: per pair p of group g (token t = rows[p]),

    g_p = gate[t] + s_g[g] * (x_gate[p] @ A_g[g].T) @ B_g[g].T       (I,)
    u_p = up[t]   + s_u[g] * (x_up[p]   @ A_u[g].T) @ B_u[g].T       (I,)
    z_p = silu(g_p) * u_p                                           (I,)  the down LoRA's input
    zsum[t] += w_p * z_p                                            (I,)  the frozen down's input

`gate`/`up` are the frozen projections of every token, computed once per token; the LoRA
deltas, the SiLU*up epilogue, the routing weight and the per-token sum happen in one pass over
(P, I) tiles, where the unfused path writes and re-reads g, u, z and w*z. The backward
recomputes g and u from the saved rank-space rows (P, R) instead of storing them.

Layers: `_glu_kernel` (forward and backward, by a constexpr) + launchers -> `ExpertGluFn` ->
`expert_glu`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mixloom.kernels import common
from mixloom.kernels.common import expand_tile, tile_pairs
from mixloom.kernels.segmented import lora_backward, shrink, zero_outside


@triton.jit
def _glu_kernel(
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
    z_ptr,  # (P, I) forward: out, z in gate's dtype; backward: in, dL/dz
    zsum_ptr,  # (T, I) forward: out, fp32, zeroed; backward: in, dL/dzsum
    dg_ptr,  # (P, I) backward out: dL/dg_p, gate's dtype
    du_ptr,  # (P, I) backward out: dL/du_p
    dgate_ptr,  # (T, I) backward out, fp32, zeroed: dL/dgate (sum over the token's pairs)
    dup_ptr,  # (T, I) backward out, fp32, zeroed
    dw_part_ptr,  # (P, n_col_blocks) backward out, fp32: this column block's share of dL/dw_p
    tiles_ptr,  # (2, n_tiles) int32
    offsets_ptr,  # (G+1,) int64
    n_inter,
    R,
    n_tiles,
    stride_hm,
    stride_bg,
    stride_bn,
    stride_br,
    stride_tm,  # row stride of the (T, I) tensors (unit column stride)
    stride_zm,  # row stride of the (P, I) tensors (unit column stride)
    stride_wp,  # dw_part row stride
    BACKWARD: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    g, offs_m, mask_m = tile_pairs(tiles_ptr, offsets_ptr, n_tiles, BLOCK_M)
    if g < 0:
        return
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_inter
    mask = mask_m[:, None] & mask_n[None, :]
    tok = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    gv = expand_tile(hg_ptr, bg_ptr, g, offs_m, mask_m, offs_n, mask_n, R, stride_hm, 1,
                     stride_bg, stride_bn, stride_br, DOT_FP32, DOT, BLOCK_M, BLOCK_N,
                     BLOCK_R)  # fmt: skip
    uv = expand_tile(hu_ptr, bu_ptr, g, offs_m, mask_m, offs_n, mask_n, R, stride_hm, 1,
                     stride_bg, stride_bn, stride_br, DOT_FP32, DOT, BLOCK_M, BLOCK_N,
                     BLOCK_R)  # fmt: skip
    tbase = tok[:, None] * stride_tm + offs_n[None, :]
    pbase = offs_m.to(tl.int64)[:, None] * stride_zm + offs_n[None, :]
    gv = gv * tl.load(sg_ptr + g) + tl.load(gate_ptr + tbase, mask=mask, other=0.0).to(tl.float32)
    uv = uv * tl.load(su_ptr + g) + tl.load(up_ptr + tbase, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gv)
    act = gv * sig  # silu(g), (BLOCK_M, BLOCK_N) fp32
    w = tl.load(w_ptr + offs_m, mask=mask_m, other=0.0)
    if BACKWARD:
        dzsum = tl.load(zsum_ptr + tbase, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(z_ptr + pbase, mask=mask, other=0.0).to(tl.float32) + w[:, None] * dzsum
        dg = dz * uv * sig * (1.0 + gv * (1.0 - sig))  # silu'(g) = s(g) * (1 + g * (1 - s(g)))
        du = dz * act
        tl.store(dg_ptr + pbase, dg.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + pbase, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.atomic_add(dgate_ptr + tbase, dg, mask=mask)
        tl.atomic_add(dup_ptr + tbase, du, mask=mask)
        dw = tl.sum(tl.where(mask, dzsum * act * uv, 0.0), axis=1)  # (BLOCK_M,)
        tl.store(dw_part_ptr + offs_m.to(tl.int64) * stride_wp + pid_n, dw, mask=mask_m)
    else:
        z = act * uv
        tl.store(z_ptr + pbase, z.to(z_ptr.dtype.element_ty), mask=mask)
        # At most top-k adds per token row; with k <= 2 the fp32 sum is order-independent.
        tl.atomic_add(zsum_ptr + tbase, z * w[:, None], mask=mask)


def _launch(hg, hu, Bg, Bu, sg, su, gate, up, w, pairs, z, zsum, grads, dw_part) -> None:
    """One launch of _glu_kernel over every tile; the backward when `grads` (dg, du, dgate,
    dup) and dw_part are given, the forward otherwise."""
    P, n_inter = pairs.num_pairs, gate.shape[1]
    if not (P and n_inter and Bg.shape[0]):
        return
    t = common.tiles()
    backward = grads is not None
    block_n = t.glu_block_n_bwd if backward else t.glu_block_n_fwd
    tile_table = pairs.tiles
    n_tiles = tile_table.shape[1]
    unused = pairs.offsets
    dg, du, dgate, dup = grads if backward else (unused,) * 4
    _glu_kernel[(n_tiles, triton.cdiv(n_inter, block_n))](
        hg, hu, Bg, Bu, sg, su, gate, up, pairs.rows, w, z, zsum, dg, du, dgate, dup,
        dw_part if backward else unused, tile_table, pairs.offsets, n_inter, Bg.shape[2],
        n_tiles, hg.stride(0), Bg.stride(0), Bg.stride(1), Bg.stride(2), gate.stride(0),
        z.stride(0), dw_part.stride(0) if backward else 0, BACKWARD=backward,
        **common.dot_options(gate.dtype), BLOCK_M=t.block_m, BLOCK_N=block_n,
        BLOCK_R=common.block_r(Bg.shape[2]), num_warps=t.glu_warps, num_stages=t.stages,
    )  # fmt: skip


def glu_forward(hg, hu, Bg, Bu, sg, su, gate, up, w, pairs):
    """-> z (P, I) in gate's dtype, zsum (T, I) fp32."""
    P, (T, n_inter) = pairs.num_pairs, gate.shape
    z = torch.empty(P, n_inter, device=gate.device, dtype=gate.dtype)
    zsum = torch.zeros(T, n_inter, device=gate.device, dtype=torch.float32)
    _launch(hg, hu, Bg, Bu, sg, su, gate, up, w, pairs, z, zsum, None, None)
    return zero_outside(z, pairs), zsum


def glu_backward(hg, hu, Bg, Bu, sg, su, gate, up, w, pairs, dz, dzsum):
    """-> dg, du (P, I) in gate's dtype; dgate, dup (T, I) fp32; dw (P,) fp32."""
    P, (T, n_inter) = pairs.num_pairs, gate.shape
    # rows of pairs outside every group stay unset: nothing downstream reads them
    dg = torch.empty(P, n_inter, device=gate.device, dtype=gate.dtype)
    du = torch.empty_like(dg)
    dgate = torch.zeros(T, n_inter, device=gate.device, dtype=torch.float32)
    dup = torch.zeros_like(dgate)
    n_col = triton.cdiv(n_inter, common.tiles().glu_block_n_bwd)
    dw_part = torch.zeros(P, n_col, device=gate.device, dtype=torch.float32)
    _launch(hg, hu, Bg, Bu, sg, su, gate, up, w, pairs, dz, dzsum, (dg, du, dgate, dup), dw_part)
    return dg, du, dgate, dup, dw_part.sum(1)


class ExpertGluFn(torch.autograd.Function):
    """(z, zsum) of expert_glu; grads for x_gate, x_up, gate, up, A_g, B_g, A_u, B_u, w."""

    @staticmethod
    def forward(ctx, x_gate, x_up, gate, up, Ag, Bg, Au, Bu, sg, su, w, pairs, x_rows):  # type: ignore[override]
        # The kernel shares one row stride between gate, up and their grads: contiguous.
        gate, up = gate.contiguous(), up.contiguous()
        wf = w.float()
        hg = shrink(x_gate, Ag, pairs, rows=x_rows)  # (P, R) fp32
        hu = shrink(x_up, Au, pairs, rows=x_rows)  # (P, R) fp32
        z, zsum = glu_forward(hg, hu, Bg, Bu, sg, su, gate, up, wf, pairs)
        ctx.save_for_backward(x_gate, x_up, gate, up, Ag, Bg, Au, Bu, sg, su, wf, hg, hu)
        ctx.pairs, ctx.x_rows, ctx.w_dtype = pairs, x_rows, w.dtype
        return z, zsum.to(gate.dtype)

    @staticmethod
    def backward(ctx, dz, dzsum):  # type: ignore[override]
        x_gate, x_up, gate, up, Ag, Bg, Au, Bu, sg, su, wf, hg, hu = ctx.saved_tensors
        pairs = ctx.pairs
        dz = gate.new_zeros(pairs.num_pairs, gate.shape[1]) if dz is None else dz.contiguous()
        dzsum = torch.zeros_like(gate) if dzsum is None else dzsum.contiguous()
        dg, du, dgate, dup, dw = glu_backward(
            hg, hu, Bg, Bu, sg, su, gate, up, wf, pairs, dz, dzsum
        )
        every = (True, True, True)
        dxg, dAg, dBg = lora_backward(dg, hg, x_gate, Ag, Bg, sg, pairs, ctx.x_rows, every)
        dxu, dAu, dBu = lora_backward(du, hu, x_up, Au, Bu, su, pairs, ctx.x_rows, every)
        return (dxg, dxu, dgate.to(gate.dtype), dup.to(up.dtype), dAg, dBg, dAu, dBu,
                None, None, dw.to(ctx.w_dtype), None, None)  # fmt: skip


def expert_glu(
    x_gate, x_up, gate, up, lora_gate, lora_up, pairs, x_rows=None
) -> tuple[Tensor, Tensor]:
    """Triton path of mixloom.kernels.expert_glu -> (z (P, I), zsum (T, I)) in gate's dtype
    (argument types as in reference.expert_glu)."""
    (Ag, Bg, sg), (Au, Bu, su) = lora_gate, lora_up
    common.check_device(x_gate, x_up, gate, up, Ag, Bg, Au, Bu, pairs.offsets)
    G, R, H = Ag.shape
    n_inter = gate.shape[1]
    for name, t, shape in (
        ("A_up", Au, (G, R, H)),
        ("B_gate", Bg, (G, n_inter, R)),
        ("B_up", Bu, (G, n_inter, R)),
        ("up", up, tuple(gate.shape)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"expert_glu: {name} has shape {tuple(t.shape)}, expected {shape}")
    pairs = common.with_tiles(pairs)
    return ExpertGluFn.apply(
        x_gate, x_up, gate, up, Ag, Bg, Au, Bu, sg.float(), su.float(), pairs.weights, pairs, x_rows
    )
