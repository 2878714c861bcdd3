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
    xs: Tensor,
    A: Tensor,
    B: Tensor,
    scale: Tensor,
    groups: tuple[Tensor, bool],
    weights: Tensor | None,
) -> Tensor:
    """(P, H) pairs sorted by group -> (P, N): scale[g] * w[p] * (xs[p] @ A[g].T) @ B[g].T."""
    dt = _compute_dtype(xs)
    ends, edges = groups
    As = _pad(A.to(dt) * scale.to(dt)[:, None, None], 1, edges)  # (G', R', H)
    h = F.grouped_mm(xs.to(dt), As.transpose(1, 2), offs=ends)  # (P, R')
    if weights is not None:
        h = h * weights.to(dt)[:, None]
    return F.grouped_mm(h, _pad(B.to(dt), 2, edges).transpose(1, 2), offs=ends)  # (P, N)


def lora_segments(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scale: Tensor,
    offsets: Tensor,
    rows: Tensor | None = None,
) -> Tensor:
    """See reference.lora_segments."""
    if not usable(x, A.shape[2], B.shape[1]):
        return reference.lora_segments(x, A, B, scale, offsets, rows)
    xs = x if rows is None else x.index_select(0, rows)  # (P, H)
    y = _shrink_expand(xs, A, B, scale, _groups(offsets, xs.shape[0]), None)
    return y.to(x.dtype)


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
) -> Tensor:
    """See reference.lora_combine."""
    if not usable(x, A.shape[2], B.shape[1]):
        return reference.lora_combine(x, A, B, scale, offsets, weights, dst, num_rows, rows)
    xs = x if rows is None else x.index_select(0, rows)  # (P, H)
    y = _shrink_expand(xs, A, B, scale, _groups(offsets, xs.shape[0]), weights)  # (P, N)
    out = y.new_zeros(num_rows, y.shape[1])
    return out.index_add_(0, dst, y).to(x.dtype)


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
) -> tuple[Tensor, Tensor]:
    """See reference.expert_glu."""
    if not usable(gate, A_gate.shape[2], B_gate.shape[1]):
        return reference.expert_glu(
            x_gate, x_up, gate, up, A_gate, B_gate, A_up, B_up, scale_gate, scale_up,
            offsets, rows, weights, x_rows,
        )  # fmt: skip
    P = rows.shape[0]
    groups = _groups(offsets, P)
    xg = x_gate if x_rows is None else x_gate.index_select(0, x_rows)
    xu = x_up if x_rows is None else x_up.index_select(0, x_rows)
    lg = _shrink_expand(xg, A_gate, B_gate, scale_gate, groups, None)  # (P, I)
    lu = _shrink_expand(xu, A_up, B_up, scale_up, groups, None)  # (P, I)
    dt = lg.dtype
    u = up.to(dt).index_select(0, rows) + lu
    if groups[1]:  # pairs outside every group get z = 0
        pair = torch.arange(P, device=rows.device)
        inside = (pair >= offsets[0]) & (pair < offsets[-1])  # (P,)
        u = u * inside.to(dt)[:, None]
    z = F.silu(gate.to(dt).index_select(0, rows) + lg) * u  # (P, I)
    zsum = z.new_zeros(gate.shape).index_add_(0, rows, z * weights.to(dt)[:, None])
    return z.to(gate.dtype), zsum.to(gate.dtype)
