"""Pure-torch reference of the grouped LoRA matmuls: the CPU path and the test oracle.

Vocabulary (shared with the Triton kernels):
- T rows of input x (tokens of every job in the fused batch), H features.
- P (row, slot) pairs, sorted by group; a group is one (job) for attention LoRA or one
  (job, expert) for MixLoRA experts. Pair p reads row `rows[p]` of x (identity if None).
- G groups; group g owns pairs [offsets[g], offsets[g+1]), rank ranks[g] <= R, scale scale[g].
- Stacked weights A: (G, R, H) and B: (G, N, R), zero beyond each group's rank.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lora_segments(
    x: Tensor,  # (T, H)
    A: Tensor,  # (G, R, H)
    B: Tensor,  # (G, N, R)
    scale: Tensor,  # (G,) fp32
    offsets: Tensor,  # (G+1,) int64, on x.device
    rows: Tensor | None = None,  # (P,) int64 or None (P == T, identity)
) -> Tensor:
    """y[p] = scale[g] * (x[rows[p]] @ A[g].T) @ B[g].T for every pair p of group g; 0 for
    pairs outside every group (before offsets[0] or from offsets[G] on: build_routing's -1).

    Returns: (P, N) in x's dtype; accumulation in fp32. Differentiable through autograd.
    """
    xs = x if rows is None else x.index_select(0, rows)  # (P, H)
    bounds = offsets.tolist()  # note: host sync; the Triton path avoids it
    P, N = xs.shape[0], B.shape[1]
    outs = [x.new_zeros(bounds[0], N, dtype=torch.float32)]  # pairs of group -1, if any
    for g in range(A.shape[0]):
        lo, hi = bounds[g], bounds[g + 1]
        if hi == lo:
            continue
        xg = xs[lo:hi].float()  # (P_g, H)
        h = xg @ A[g].float().t()  # (P_g, R)
        outs.append((h @ B[g].float().t()) * scale[g])  # (P_g, N)
    outs.append(x.new_zeros(P - bounds[-1], N, dtype=torch.float32))
    return torch.cat(outs).to(x.dtype)


def lora_combine(
    x: Tensor,  # (T_in, H)
    A: Tensor,  # (G, R, H)
    B: Tensor,  # (G, N, R)
    scale: Tensor,  # (G,) fp32
    offsets: Tensor,  # (G+1,) int64
    weights: Tensor,  # (P,) per-pair weight
    dst: Tensor,  # (P,) int64 output row of each pair
    num_rows: int,  # T_out
    rows: Tensor | None = None,  # (P,) int64 input row of each pair, or None (x is per pair)
) -> Tensor:
    """out[dst[p]] += weights[p] * scale[g] * (x[rows[p]] @ A[g].T) @ B[g].T.

    Pairs outside every group (before offsets[0] or from offsets[G] on) add nothing.
    Returns: (T_out, N) in x's dtype; accumulation in fp32. Differentiable through autograd.
    """
    xs = x if rows is None else x.index_select(0, rows)  # (P, H)
    bounds = offsets.tolist()  # note: host sync; the Triton path avoids it
    out = torch.zeros(num_rows, B.shape[1], device=x.device, dtype=torch.float32)
    for g in range(A.shape[0]):
        lo, hi = bounds[g], bounds[g + 1]
        if hi == lo:
            continue
        h = xs[lo:hi].float() @ A[g].float().t()  # (P_g, R)
        y = (h @ B[g].float().t()) * (scale[g] * weights[lo:hi].float()[:, None])  # (P_g, N)
        out = out.index_add(0, dst[lo:hi], y)
    return out.to(x.dtype)
