"""Grouped LoRA matmuls in stock torch: the "torch" backend (CPU, and any device without triton).

Same contract as reference.py, but one `torch.nn.functional.grouped_mm` per product over the
pairs sorted by group instead of a Python loop over groups. The loop's cost is not its
matmuls: autograd gives every group's slice a full-size zero gradient that is then summed
(G slices of a (P, N) tensor make G full passes), and every tiny matmul pays dispatch. On
2 CPU cores, 4 jobs x 8 experts, the loop spent more time filling and adding those zeros
than multiplying (bench/RESULTS.md, 2026-11-29).

grouped_mm wants 16-byte aligned rows: the rank is zero-padded up to that (free: the stacked
weights are copied anyway), while feature sizes that are not (no real model's) and a torch
without grouped_mm take the reference loop instead. On CUDA (where the triton backend is the
fast path) only bf16 goes through grouped_mm. Math in fp32 on CPU, like the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mixloom.kernels import reference
from mixloom.kernels.pairs import GroupedPairs, LoraStack


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.bfloat16 if x.device.type == "cuda" else torch.float32


def _align(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: grouped_mm's stride unit."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def usable(x: Tensor, *features: int) -> bool:
    """Whether grouped_mm can take products over these feature sizes on x's device."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type != "cpu" and x.dtype != torch.bfloat16:
        return False
    return all(d % _align(_compute_dtype(x)) == 0 for d in features)


def _all_inside(offsets: Tensor, num_pairs: int) -> bool:
    """Whether every pair belongs to a group. Asked on CPU only, where reading offsets costs
    nothing; on an accelerator it would wait for the queue, so the answer is "maybe not"."""
    if offsets.device.type != "cpu":
        return False
    return int(offsets[0]) == 0 and int(offsets[-1]) == num_pairs


def _groups(offsets: Tensor, num_pairs: int) -> tuple[Tensor, bool]:
    """grouped_mm's int32 group ends, and whether the weights need zero edge groups (_pad):
    when some pairs may lie outside every group, a leading group holds the pairs before
    offsets[0] and a trailing one those from offsets[G] on, both with zero weights."""
    if _all_inside(offsets, num_pairs):
        return offsets[1:].to(torch.int32), False
    tail = offsets.new_full((1,), num_pairs)
    return torch.cat([offsets, tail]).to(torch.int32), True


def _pad(W: Tensor, rank_dim: int, edges: bool) -> Tensor:
    """The rank dimension of (G, a, b) zero-padded to grouped_mm's alignment, and with
    `edges` zero first and last groups added: (G+2, a, b)."""
    extra = -W.shape[rank_dim] % _align(W.dtype)
    if extra:
        W = F.pad(W, (0, extra) if rank_dim == 2 else (0, 0, 0, extra))
    if not edges:
        return W
    zero = W.new_zeros(1, *W.shape[1:])
    return torch.cat([zero, W, zero])


def _shrink_expand(
    xs: Tensor, lora: LoraStack, groups: tuple[Tensor, bool], weights: Tensor | None
) -> Tensor:
    """(P, H) pairs sorted by group -> (P, N): scale[g] * w[p] * (xs[p] @ A[g].T) @ B[g].T."""
    A, B, scale = lora
    dt = _compute_dtype(xs)
    ends, edges = groups
    As = _pad(A.to(dt) * scale.to(dt)[:, None, None], 1, edges)  # (G', R', H)
    h = F.grouped_mm(xs.to(dt), As.transpose(1, 2), offs=ends)  # (P, R')
    if weights is not None:
        h = h * weights.to(dt)[:, None]
    return F.grouped_mm(h, _pad(B.to(dt), 2, edges).transpose(1, 2), offs=ends)  # (P, N)


def _gathered(x: Tensor, x_rows: Tensor | None) -> Tensor:
    return x if x_rows is None else x.index_select(0, x_rows)  # (P, H)


def lora_segments(
    x: Tensor, lora: LoraStack, pairs: GroupedPairs, x_rows: Tensor | None = None
) -> Tensor:
    """See reference.lora_segments."""
    if not usable(x, lora.A.shape[2], lora.B.shape[1]):
        return reference.lora_segments(x, lora, pairs, x_rows)
    groups = _groups(pairs.offsets, pairs.num_pairs)
    return _shrink_expand(_gathered(x, x_rows), lora, groups, None).to(x.dtype)


def lora_combine(
    x: Tensor, lora: LoraStack, pairs: GroupedPairs, num_rows: int, x_rows: Tensor | None = None
) -> Tensor:
    """See reference.lora_combine."""
    if not usable(x, lora.A.shape[2], lora.B.shape[1]):
        return reference.lora_combine(x, lora, pairs, num_rows, x_rows)
    groups = _groups(pairs.offsets, pairs.num_pairs)
    y = _shrink_expand(_gathered(x, x_rows), lora, groups, pairs.weights)  # (P, N)
    out = y.new_zeros(num_rows, y.shape[1])
    return out.index_add_(0, pairs.rows, y).to(x.dtype)


def expert_glu(
    x_gate, x_up, gate, up, lora_gate, lora_up, pairs, x_rows=None
) -> tuple[Tensor, Tensor]:
    """See reference.expert_glu (its argument types too)."""
    if not usable(gate, lora_gate.A.shape[2], lora_gate.B.shape[1]):
        return reference.expert_glu(x_gate, x_up, gate, up, lora_gate, lora_up, pairs, x_rows)
    offsets, P = pairs.offsets, pairs.num_pairs
    groups = _groups(offsets, P)
    lg = _shrink_expand(_gathered(x_gate, x_rows), lora_gate, groups, None)  # (P, I)
    lu = _shrink_expand(_gathered(x_up, x_rows), lora_up, groups, None)  # (P, I)
    dt = lg.dtype
    inside = None
    if groups[1]:  # pairs outside every group get z = 0
        pair = torch.arange(P, device=offsets.device)
        inside = ((pair >= offsets[0]) & (pair < offsets[-1])).to(dt)  # (P,)
    assert pairs.rows is not None and pairs.weights is not None
    z, zsum = _GluEpilogue.apply(
        gate.to(dt), up.to(dt), lg, lu, pairs.rows, pairs.weights.to(dt), inside
    )
    return z.to(gate.dtype), zsum.to(gate.dtype)


class _GluEpilogue(torch.autograd.Function):
    """z = silu(gate[rows] + lg) * (up[rows] + lu) per pair, zsum[t] += w * z per token.

    Keeps g and u (2 x (P, I)) for the backward and recomputes silu(g) and z there, where
    autograd's op-by-op graph keeps g, silu(g), u and z (4 x (P, I))."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        gate: Tensor,  # (T, I)
        up: Tensor,  # (T, I)
        lg: Tensor,  # (P, I)
        lu: Tensor,  # (P, I)
        rows: Tensor,  # (P,)
        weights: Tensor,  # (P,)
        inside: Tensor | None,  # (P,) 1/0, or None: every pair in a group
    ) -> tuple[Tensor, Tensor]:
        g = gate.index_select(0, rows).add_(lg)
        u = up.index_select(0, rows).add_(lu)
        if inside is not None:
            u.mul_(inside[:, None])
        z = F.silu(g).mul_(u)
        zsum = gate.new_zeros(gate.shape).index_add_(0, rows, z * weights[:, None])
        ctx.save_for_backward(g, u, rows, weights, inside)  # type: ignore[attr-defined]
        ctx.num_rows = gate.shape[0]  # type: ignore[attr-defined]
        return z, zsum

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dz: Tensor | None, dzsum: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        g, u, rows, weights, inside = ctx.saved_tensors  # type: ignore[attr-defined]
        a = F.silu(g)
        dw = None
        if dzsum is not None:
            dzs = dzsum.index_select(0, rows)  # (P, I)
            dw = (dzs * a).mul_(u).sum(1)  # d/dw of w * z, z = a * u
            w = weights[:, None]
            dzt = dzs.mul_(w) if dz is None else torch.addcmul(dz, dzs, w)  # total dL/dz
        else:
            dzt = torch.zeros_like(g) if dz is None else dz.clone()
        du = dzt * a
        if inside is not None:
            du.mul_(inside[:, None])
        dg = torch.ops.aten.silu_backward(dzt.mul_(u), g)
        shape = (ctx.num_rows, g.shape[1])  # type: ignore[attr-defined]
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        dgate = g.new_zeros(shape).index_add_(0, rows, dg) if need[0] else None
        dup = g.new_zeros(shape).index_add_(0, rows, du) if need[1] else None
        return dgate, dup, dg, du, None, dw, None
