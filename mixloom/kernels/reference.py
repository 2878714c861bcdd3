"""Pure-torch reference of the grouped LoRA matmuls: a plain loop over groups, the test oracle.

Vocabulary (shared with the Triton kernels):
- T rows of input x (tokens of every job in the fused batch), H features.
- P (row, slot) pairs, sorted by group (batch.GroupedPairs); a group is one (job) for
  attention LoRA or one (job, expert) for MixLoRA experts. Pair p reads row `x_rows[p]` of x,
  or row p of a per-pair x when x_rows is None.
- G groups; group g owns pairs [offsets[g], offsets[g+1]), rank ranks[g] <= R, scale scale[g].
- Stacked weights (batch.LoraStack) A: (G, R, H) and B: (G, N, R), zero beyond each group's
  rank.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mixloom.kernels.pairs import GroupedPairs, LoraStack


def lora_segments(
    x: Tensor,  # (T, H), or (P, H) when x_rows is None
    lora: LoraStack,  # A (G, R, H), B (G, N, R), scale (G,) fp32
    pairs: GroupedPairs,
    x_rows: Tensor | None = None,  # (P,) int64 row of x of each pair, or None (x per pair)
) -> Tensor:
    """y[p] = scale[g] * (x[x_rows[p]] @ A[g].T) @ B[g].T for every pair p of group g; 0 for
    pairs outside every group (before offsets[0] or from offsets[G] on: group_pairs' -1).

    Returns: (P, N) in x's dtype; accumulation in fp32. Differentiable through autograd.
    """
    A, B, scale = lora
    xs = x if x_rows is None else x.index_select(0, x_rows)  # (P, H)
    bounds = pairs.offsets.tolist()  # note: host sync; the Triton path avoids it
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
    x: Tensor,  # (T_in, H), or (P, H) when x_rows is None
    lora: LoraStack,
    pairs: GroupedPairs,  # with rows (output row of each pair) and weights
    num_rows: int,  # T_out
    x_rows: Tensor | None = None,  # (P,) int64 row of x of each pair, or None (x per pair)
) -> Tensor:
    """out[rows[p]] += weights[p] * scale[g] * (x[x_rows[p]] @ A[g].T) @ B[g].T.

    Pairs outside every group (before offsets[0] or from offsets[G] on) add nothing.
    Returns: (T_out, N) in x's dtype; accumulation in fp32. Differentiable through autograd.
    """
    A, B, scale = lora
    dst, weights = pairs.rows, pairs.weights
    assert dst is not None and weights is not None
    xs = x if x_rows is None else x.index_select(0, x_rows)  # (P, H)
    bounds = pairs.offsets.tolist()  # note: host sync; the Triton path avoids it
    out = torch.zeros(num_rows, B.shape[1], device=x.device, dtype=torch.float32)
    for g in range(A.shape[0]):
        lo, hi = bounds[g], bounds[g + 1]
        if hi == lo:
            continue
        h = xs[lo:hi].float() @ A[g].float().t()  # (P_g, R)
        y = (h @ B[g].float().t()) * (scale[g] * weights[lo:hi].float()[:, None])  # (P_g, N)
        out = out.index_add(0, dst[lo:hi], y)
    return out.to(x.dtype)


def expert_glu(
    x_gate: Tensor,  # (T_in, H), or (P, H) when x_rows is None
    x_up: Tensor,  # likewise
    gate: Tensor,  # (T, I) frozen gate projection of every token
    up: Tensor,  # (T, I) frozen up projection of every token
    lora_gate: LoraStack,  # B: (G, I, R)
    lora_up: LoraStack,
    pairs: GroupedPairs,  # with rows (token of each pair) and weights
    x_rows: Tensor | None = None,  # (P,) int64 row of x_gate/x_up of each pair; None: per pair
) -> tuple[Tensor, Tensor]:
    """MixLoRA expert gate/up with the SiLU*up epilogue, per pair p of group g, t = rows[p]:
    z[p] = silu(gate[t] + LoRA_g(x_gate)[p]) * (up[t] + LoRA_u(x_up)[p]);
    zsum[t] = sum over the token's pairs of weights[p] * z[p].

    Pairs outside every group get z = 0 and add nothing.
    Returns: z (P, I) and zsum (T, I), in gate's dtype; math in fp32.
    """
    rows, weights, offsets = pairs.rows, pairs.weights, pairs.offsets
    assert rows is not None and weights is not None
    lg = lora_segments(x_gate.float(), lora_gate, pairs, x_rows)  # (P, I)
    lu = lora_segments(x_up.float(), lora_up, pairs, x_rows)  # (P, I)
    g = gate.float().index_select(0, rows) + lg.float()
    u = up.float().index_select(0, rows) + lu.float()
    pair = torch.arange(pairs.num_pairs, device=rows.device)
    inside = (pair >= offsets[0]) & (pair < offsets[-1])  # (P,)
    z = torch.nn.functional.silu(g) * u * inside[:, None]  # (P, I)
    zsum = torch.zeros(gate.shape, device=gate.device, dtype=torch.float32)
    zsum = zsum.index_add(0, rows, z * weights.float()[:, None])
    return z.to(gate.dtype), zsum.to(gate.dtype)


_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key increments (Weyl)


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = 10) -> np.ndarray:
    """Philox4x32-`rounds` of (..., 4) uint32 counters under a two-word key -> (..., 4)
    uint32 words (Salmon et al., SC'11; Random123's known answers hold for it)."""
    c = [counter[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    lo32 = np.uint64(0xFFFFFFFF)
    for _ in range(rounds):
        p0 = np.uint64(_PHILOX_M[0]) * c[0]  # < 2**64: exact in uint64
        p1 = np.uint64(_PHILOX_M[1]) * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k0,
            p1 & lo32,
            (p0 >> np.uint64(32)) ^ c[3] ^ k1,
            p0 & lo32,
        ]
        k0 = (k0 + np.uint64(_PHILOX_W[0])) & lo32
        k1 = (k1 + np.uint64(_PHILOX_W[1])) & lo32
    return np.stack(c, axis=-1).astype(np.uint32)


def philox_keep(
    seeds: Tensor,  # (J,) int64
    job: Tensor,  # (rows,) int32
    local: Tensor,  # (rows,) int64
    thresholds: Tensor,  # (rows,) int32
    cols: int,
    key: tuple[int, int],
) -> Tensor:
    """kernels.dropout.keep_mask, computed with numpy on the host: the oracle."""
    seed = seeds.cpu().numpy().view(np.uint64)[job.cpu().numpy()]  # (rows,)
    groups = (cols + 7) // 8
    counter: np.ndarray = np.add(
        local.cpu().numpy().astype(np.uint64)[:, None] * np.uint64(groups),
        np.arange(groups, dtype=np.uint64),
        dtype=np.uint64,
    )  # (rows, groups)
    ctr = np.stack(
        [
            counter & np.uint64(0xFFFFFFFF),
            counter >> np.uint64(32),
            np.broadcast_to((seed & np.uint64(0xFFFFFFFF))[:, None], counter.shape),
            np.broadcast_to((seed >> np.uint64(32))[:, None], counter.shape),
        ],
        axis=-1,
    ).astype(np.uint32)
    words = philox4x32(ctr, key)  # (rows, groups, 4): lanes 2i, 2i+1 = low, high half of word i
    bits = words.view(np.uint16).astype(np.int32)  # (rows, groups, 8), little-endian halves
    bits = bits.reshape(counter.shape[0], groups * 8)[:, :cols]
    signed = bits - ((bits & 0x8000) << 1)
    keep = signed >= thresholds.cpu().numpy()[:, None]
    return torch.from_numpy(keep).to(seeds.device)
