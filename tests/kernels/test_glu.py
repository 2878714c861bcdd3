"""Fused MixLoRA expert gate/up (expert_glu) vs the reference: forward and every gradient."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from needs import need_module
from test_segmented import (
    BACKENDS,
    CASES,
    DEVICE,
    DTYPES,
    ON_GPU,
    TOL,
    Case,
    _grads,
    _make,
    _rel,
)

from mixloom import kernels
from mixloom.kernels import LoraStack, reference

need_module("triton", "pip install -e '.[dev]' (scripts/setup.sh does)")


# Each aspect once (interpreter time): top-2 / top-1 odd / empty groups, gathered / per-pair
# input, every dtype.
PARAMS = [
    (CASES[2], False, torch.float32),
    (CASES[2], True, torch.float16),
    (CASES[3], True, torch.float32),
    (CASES[4], False, torch.float16),
] + [(CASES[2], False, d) for d in DTYPES if d == torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("case", "per_pair", "dtype"),
    PARAMS,
    ids=lambda v: getattr(v, "name", None) or str(v),
)
def test_expert_glu_matches_reference(case: Case, dtype: torch.dtype, per_pair: bool, backend: str):
    """per_pair: x_gate/x_up one row per pair with different values (dropout masks),
    else one shared x per token gathered by rows."""
    x, A, B, scale, groups, weights, G = _make(case, dtype)
    if not per_pair:  # (the per-pair cases keep every pair in a group)
        groups[2, 0] = -1  # a pair outside every group: z = 0, adds nothing
    pairs = kernels.group_pairs(groups, G, weights=weights, with_tiles=True)
    P, N = pairs.num_pairs, case.N
    g = torch.Generator().manual_seed(7)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=DEVICE, dtype=dtype)

    gate, up = rnd(case.T, N), rnd(case.T, N)
    A_up, B_up = rnd(*A.shape, std=case.H**-0.5), rnd(*B.shape)
    xg, xu = (rnd(P, case.H), rnd(P, case.H)) if per_pair else (x, x)
    x_rows = None if per_pair else pairs.rows
    scale_up = scale.flip(0)

    def tri(xg, xu, gate, up, Ag, Bg, Au, Bu, w):
        lg, lu, p = LoraStack(Ag, Bg, scale), LoraStack(Au, Bu, scale_up), replace(pairs, weights=w)
        z, zsum = kernels.expert_glu(
            xg, xu, gate, up, lg, lu, p, per_pair=per_pair, backend=backend
        )
        return torch.cat([z, zsum])

    def ref(xg, xu, gate, up, Ag, Bg, Au, Bu, w):
        lg, lu, p = LoraStack(Ag, Bg, scale), LoraStack(Au, Bu, scale_up), replace(pairs, weights=w)
        return torch.cat(reference.expert_glu(xg, xu, gate, up, lg, lu, p, x_rows))

    inputs = [xg, xu, gate, up, A, B, A_up, B_up, pairs.weights]
    if ON_GPU and backend == "triton":  # forward and backward queue work without a host copy
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        out, grads = _grads(tri, inputs, seed=8)
    finally:
        if ON_GPU and backend == "triton":
            torch.cuda.set_sync_debug_mode(0)
    out_ref, grads_ref = _grads(ref, [t.float() for t in inputs], seed=8)
    assert out.dtype == dtype
    assert _rel(out, out_ref) < TOL[dtype]
    names = ("dx_gate", "dx_up", "dgate", "dup", "dA_gate", "dB_gate", "dA_up", "dB_up", "dw")
    for name, got, want in zip(names, grads, grads_ref, strict=True):
        assert got.dtype == (torch.float32 if name == "dw" else dtype), name
        assert _rel(got, want) < TOL[dtype], name
