"""Both kernel backends (triton's segmented kernels, torch's grouped_mm path) vs the per-group
reference loop: forward and every gradient.

Runs on CPU under TRITON_INTERPRET=1 (tiles cast to fp32 there, so these check indexing and
math), or on a GPU with TRITON_INTERPRET=0 (bench/gpu.sh), where bf16 is checked as well.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace

import pytest
import torch
from needs import need_module

from mixloom import kernels
from mixloom.kernels import LoraStack, reference

need_module("triton", "pip install -e '.[dev]' (scripts/setup.sh does)")

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# ||out - ref|| / ||ref|| bounds: fp32 exact-ish; fp16/bf16 inputs rounded once, h rounded
# to the input dtype on the GPU's tensor cores.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
BACKENDS = ["triton", "torch"]


@dataclass(frozen=True)
class Case:
    """One workload: `ranks` per job, `experts` per job (0: attention-style, one group)."""

    name: str
    T: int
    H: int
    N: int
    ranks: tuple[int, ...]
    experts: int
    k: int
    skew: bool = False  # route every pair to the first expert of each job (empty groups)


CASES = [
    Case("one_group_odd_rank", T=33, H=40, N=24, ranks=(6,), experts=0, k=1),
    Case("jobs_mixed_ranks", T=50, H=48, N=40, ranks=(4, 16, 8), experts=0, k=1),
    Case("experts_top2", T=60, H=48, N=64, ranks=(8, 16, 4), experts=6, k=2),
    Case("experts_top1_odd", T=45, H=37, N=29, ranks=(5, 3), experts=3, k=1),
    Case("experts_empty_groups", T=40, H=32, N=48, ranks=(16, 2), experts=4, k=2, skew=True),
]


def _make(case: Case, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    jobs = len(case.ranks)
    per_job = max(case.experts, 1)
    G = jobs * per_job
    R = max(case.ranks)
    job_of_row = torch.randint(0, jobs, (case.T,), generator=g).sort().values  # rows by job
    if case.experts:
        logits = torch.randn(case.T, case.experts, generator=g)
        if case.skew:
            logits[:, 0] += 100.0
        probs, expert = logits.softmax(-1).topk(case.k, dim=-1)  # (T, k)
        weights = probs / probs.sum(-1, keepdim=True)
        groups = job_of_row[:, None] * per_job + expert  # (T, k)
    else:
        weights = torch.ones(case.T, 1)
        groups = job_of_row[:, None]
    # Zero-padded stacks beyond each job's rank, as the model builds them.
    rank_of_group = torch.tensor(case.ranks).repeat_interleave(per_job)  # (G,)
    live = torch.arange(R)[None, :] < rank_of_group[:, None]  # (G, R)
    A = torch.randn(G, R, case.H, generator=g) / case.H**0.5 * live[:, :, None]
    B = torch.randn(G, case.N, R, generator=g) * live[:, None, :]
    scale = 2.0 / rank_of_group.float()
    x = torch.randn(case.T, case.H, generator=g)
    dev = dict(device=DEVICE)
    return (
        x.to(dtype).to(**dev),
        A.to(dtype).to(**dev),
        B.to(dtype).to(**dev),
        scale.to(**dev),
        groups.to(**dev),
        weights.to(**dev),
        G,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten output?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _grads(fn, inputs, seed: int):
    """Forward, then gradients of a random upstream gradient wrt every input."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    g = torch.Generator(device=out.device).manual_seed(seed)  # on device: no host copy
    dout = torch.randn(out.shape, generator=g, device=out.device).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_lora_segments_matches_reference(case: Case, dtype: torch.dtype, backend: str):
    x, A, B, scale, groups, _, G = _make(case, dtype)
    if case.experts:
        groups[1, 0] = -1  # a pair outside every group: output 0, no gradient
        pairs = kernels.group_pairs(groups, G, with_tiles=True)
    else:  # attention LoRA: each job's rows laid out together (_make sorts the rows by job)
        sizes = torch.bincount(groups[:, 0].cpu(), minlength=G).tolist()
        pairs = kernels.row_blocks([0, *itertools.accumulate(sizes)], x.device, with_tiles=True)

    def tri(x, A, B):
        return kernels.lora_segments(x, LoraStack(A, B, scale), pairs, backend=backend)

    def ref(x, A, B):
        return reference.lora_segments(x, LoraStack(A, B, scale), pairs, pairs.rows)

    y, grads = _grads(tri, [x, A, B], seed=1)
    y_ref, grads_ref = _grads(ref, [x.float(), A.float(), B.float()], seed=1)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert _rel(y, y_ref) < TOL[dtype]
    for name, got, want in zip(("dx", "dA", "dB"), grads, grads_ref, strict=True):
        assert got.dtype == dtype, name
        assert _rel(got, want) < TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_pair", [False, True], ids=["gather", "per_pair"])
@pytest.mark.parametrize("case", [c for c in CASES if c.experts], ids=lambda c: c.name)
def test_lora_combine_matches_reference(
    case: Case, dtype: torch.dtype, per_pair: bool, backend: str
):
    """Weighted scatter-add per token, gradients through x, A, B and the routing weights.

    per_pair: x holds one row per pair (the down projection's z), else x is per token.
    """
    x, A, B, scale, groups, weights, G = _make(case, dtype)
    groups[0, 0] = -1  # a pair that belongs to no group adds nothing
    pairs = kernels.group_pairs(groups, G, weights=weights, with_tiles=True)
    P = pairs.num_pairs
    if per_pair:
        x = torch.randn(P, case.H, generator=torch.Generator().manual_seed(3)).to(x)
    x_rows = None if per_pair else pairs.rows

    def tri(x, A, B, w):
        lora, p = LoraStack(A, B, scale), replace(pairs, weights=w)
        return kernels.lora_combine(x, lora, p, case.T, per_pair=per_pair, backend=backend)

    def ref(x, A, B, w):
        lora, p = LoraStack(A, B, scale), replace(pairs, weights=w)
        return reference.lora_combine(x, lora, p, case.T, x_rows)

    out, grads = _grads(tri, [x, A, B, pairs.weights], seed=2)
    out_ref, grads_ref = _grads(ref, [x.float(), A.float(), B.float(), pairs.weights], seed=2)
    assert out.dtype == dtype and out.shape == (case.T, case.N)
    assert _rel(out, out_ref) < TOL[dtype]
    for name, got, want in zip(("dx", "dA", "dB", "dweights"), grads, grads_ref, strict=True):
        assert _rel(got, want) < TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_all_pairs_outside_groups(backend: str):
    case = CASES[2]
    x, A, B, scale, groups, weights, G = _make(case, torch.float32)
    w = weights.requires_grad_(True)
    pairs = kernels.group_pairs(torch.full_like(groups, -1), G, weights=w, with_tiles=True)
    lora = LoraStack(A, B, scale)
    out = kernels.lora_combine(x, lora, pairs, case.T, backend=backend)
    assert out.abs().max() == 0
    (dw,) = torch.autograd.grad(out.sum(), [w])
    assert dw.abs().max() == 0
    empty = kernels.group_pairs(groups[:0], G, with_tiles=True)
    y = kernels.lora_segments(x[:0], lora, empty, backend=backend)
    assert y.shape == (0, case.N)


def test_wrong_tile_table_is_refused():
    case = CASES[2]
    x, A, B, scale, groups, _, G = _make(case, torch.float32)
    pairs = kernels.group_pairs(groups, G)
    bad = replace(pairs, tiles=kernels.tile_table(pairs.offsets, pairs.num_pairs, tile_m=1024))
    with pytest.raises(ValueError, match="tile table"):
        kernels.lora_segments(x, LoraStack(A, B, scale), bad, backend="triton")


def test_per_pair_input_of_another_length_is_refused():
    case = CASES[2]
    x, A, B, scale, groups, _, G = _make(case, torch.float32)
    pairs = kernels.group_pairs(groups, G)
    with pytest.raises(ValueError, match="one row per pair"):
        kernels.lora_segments(x, LoraStack(A, B, scale), pairs, per_pair=True)


def test_layer_chain_transposed_weights_no_host_sync():
    """A MixLoRA-like chain: pairs, gathered up (lora_segments), then down (lora_combine) with
    transposed weight views, forward and backward vs the reference; on a GPU, also with
    torch's sync debug mode set to error: not one device->host copy on the triton path."""
    case = CASES[2]
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x, A, B, scale, groups, weights, G = _make(case, dtype)

    def chain(backend, x, A, B, w):
        p = kernels.group_pairs(groups, G, weights=w, with_tiles=backend == "triton")
        up, down = LoraStack(A, B, scale), LoraStack(B.transpose(1, 2), A.transpose(1, 2), scale)
        if backend == "reference":
            y = reference.lora_segments(x, up, p, p.rows)
            return reference.lora_combine(y, down, p, case.T)
        y = kernels.lora_segments(x, up, p, backend=backend)  # (P, N)
        return kernels.lora_combine(y, down, p, case.T, per_pair=True, backend=backend)

    leaves = [t.detach().requires_grad_(True) for t in (x, A, B, weights)]
    dout = torch.randn(case.T, case.H, generator=torch.Generator().manual_seed(5)).to(x)
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = chain("triton", *leaves)
        grads = torch.autograd.grad(out, leaves, dout)
    finally:
        if ON_GPU:
            torch.cuda.set_sync_debug_mode(0)
    ref_leaves = [t.detach().float().requires_grad_(True) for t in (x, A, B, weights)]
    ref = chain("reference", *ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    assert _rel(out, ref) < TOL[dtype]
    for name, got, want in zip(("dx", "dA", "dB", "dweights"), grads, ref_grads, strict=True):
        assert _rel(got, want) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_fp32_adapter_weights_over_half_activations(dtype: torch.dtype):
    """The model's usual mix: fp32 adapter weights, fp16/bf16 activations. Outputs and dx
    come back in the activations' dtype, dA/dB in fp32."""
    case = CASES[2]
    x, A, B, scale, groups, weights, G = _make(case, dtype)
    A, B = A.float(), B.float()
    pairs = kernels.group_pairs(groups, G, weights=weights, with_tiles=True)

    def chain(run_segments, run_combine, x, A, B, w):
        p = replace(pairs, weights=w)
        up, down = LoraStack(A, B, scale), LoraStack(B.transpose(1, 2), A.transpose(1, 2), scale)
        return run_combine(run_segments(x, up, p), down, p)

    def tri(*leaves):
        return chain(
            lambda x, lora, p: kernels.lora_segments(x, lora, p, backend="triton"),
            lambda y, lora, p: kernels.lora_combine(
                y, lora, p, case.T, per_pair=True, backend="triton"
            ),
            *leaves,
        )

    def ref(*leaves):
        return chain(
            lambda x, lora, p: reference.lora_segments(x, lora, p, p.rows),
            lambda y, lora, p: reference.lora_combine(y, lora, p, case.T),
            *leaves,
        )

    out, grads = _grads(tri, [x, A, B, pairs.weights], seed=4)
    out_ref, grads_ref = _grads(ref, [x.float(), A, B, pairs.weights], seed=4)
    assert out.dtype == dtype
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32, torch.float32]
    assert _rel(out, out_ref) < 2 * TOL[dtype]
    for name, got, want in zip(("dx", "dA", "dB", "dweights"), grads, grads_ref, strict=True):
        assert _rel(got, want) < 2 * TOL[dtype], name


def test_torch_backend_takes_grouped_mm_where_it_can():
    """The torch backend's grouped_mm path (not its reference fallback) runs the aligned
    cases above; odd feature sizes fall back to the reference loop."""
    from mixloom.kernels import grouped

    x = torch.zeros(4, 8)
    assert grouped.usable(x, 40, 24) == hasattr(torch.nn.functional, "grouped_mm")
    assert not grouped.usable(x, 37, 29)
