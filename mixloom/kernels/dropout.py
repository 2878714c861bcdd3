"""Dropout keep-masks of many jobs in one launch, from a counter-based generator (Philox).

A fused batch holds rows of several jobs, and each job's dropout must come from its own
stream: a job's masks may depend neither on the other jobs nor on how the batch is padded.
Drawn from per-job generators that is one draw (one launch on a GPU) per job and projection,
twice where the adapter activations are recomputed. Here each job contributes one 64-bit seed,
drawn on the host from its own stream, and one kernel writes the whole batch's mask:

    decision (r, c) = 16 bits of Philox4x32-10(key, counter = (n_r * cdiv(cols, 8) + c // 8,
                      seed of r's job)), lane c % 8 of its four 32-bit words
    keep[r, c] = signed16(decision) >= threshold[r]

where n_r is row r's index among its job's rows. A row's bits are a pure function of its
job's seed and its own index, so they are the same whichever jobs share the batch; a replay
(the backward of a recomputed region) passes the same seeds and gets the same mask for free.

One Philox evaluation gives eight 16-bit decisions. Thresholds are `layers._threshold`'s int16
scale: keep when the bits, read as int16, reach it (-32768: always; 32768: never).
`reference.philox_keep` is the numpy oracle the tests hold this kernel to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mixloom.kernels import common

# Rows and 8-column groups per program: few programs under the interpreter (it pays per
# program); 256 columns a program on a GPU.
BLOCK_M, BLOCK_G = (256, 16) if common.INTERPRETED else (32, 32)

# Philox key (fixed: the job's seed is in the counter). "mixl", "oom!" in ASCII.
KEY = (0x6D69786C, 0x6F6F6D21)


@triton.jit
def _keep_kernel(
    out_ptr,  # (rows, cols) bool as uint8
    seeds_ptr,  # (J,) int64, one per job
    job_ptr,  # (rows,) int32: the job of each row
    local_ptr,  # (rows,) int64: each row's index among its job's rows
    thr_ptr,  # (rows,) int32
    rows,
    cols,
    stride_o,
    KEY0: tl.constexpr,
    KEY1: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < rows
    job = tl.load(job_ptr + offs_m, mask=mask_m, other=0)
    seed = tl.load(seeds_ptr + job, mask=mask_m, other=0).to(tl.uint64, bitcast=True)
    local = tl.load(local_ptr + offs_m, mask=mask_m, other=0).to(tl.uint64, bitcast=True)
    thr = tl.load(thr_ptr + offs_m, mask=mask_m, other=0)
    groups = (cols + 7) // 8
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    counter = local[:, None] * groups.to(tl.uint64) + offs_g[None, :].to(
        tl.uint64
    )  # (BLOCK_M, BLOCK_G)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.broadcast_to((seed & 0xFFFFFFFF).to(tl.uint32)[:, None], (BLOCK_M, BLOCK_G))
    c3 = tl.broadcast_to((seed >> 32).to(tl.uint32)[:, None], (BLOCK_M, BLOCK_G))
    k0 = tl.full((BLOCK_M, BLOCK_G), KEY0, tl.uint32)
    k1 = tl.full((BLOCK_M, BLOCK_G), KEY1, tl.uint32)
    w0, w1, w2, w3 = tl.philox_impl(c0, c1, c2, c3, k0, k1)
    base = out_ptr + offs_m.to(tl.int64)[:, None] * stride_o
    for lane in tl.static_range(8):
        if lane // 2 == 0:
            word = w0
        elif lane // 2 == 1:
            word = w1
        elif lane // 2 == 2:
            word = w2
        else:
            word = w3
        bits = ((word >> (16 * (lane % 2))) & 0xFFFF).to(tl.int32)
        signed = bits - ((bits & 0x8000) << 1)  # the 16 bits read as int16
        col = offs_g * 8 + lane
        keep = signed >= thr[:, None]
        tl.store(
            base + col[None, :],
            keep.to(tl.uint8),
            mask=mask_m[:, None] & (col[None, :] < cols),
        )


def keep_mask(
    seeds: Tensor,  # (J,) int64
    job: Tensor,  # (rows,) int32
    local: Tensor,  # (rows,) int64
    thresholds: Tensor,  # (rows,) int32
    cols: int,
) -> Tensor:
    """(rows, cols) bool keep-decisions; see the module docstring."""
    dev = seeds.device
    common.check_device(seeds)
    for name, t in (("job", job), ("local", local), ("thresholds", thresholds)):
        if t.device != dev or t.shape != job.shape:
            raise ValueError(f"keep_mask: {name} must be ({job.shape[0]},) on {dev}")
    rows = job.shape[0]
    out = torch.empty(rows, cols, device=dev, dtype=torch.bool)
    if rows == 0 or cols == 0:
        return out
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(triton.cdiv(cols, 8), BLOCK_G))
    _keep_kernel[grid](
        out.view(torch.uint8),
        seeds,
        job,
        local,
        thresholds,
        rows,
        cols,
        out.stride(0),
        KEY0=KEY[0],
        KEY1=KEY[1],
        BLOCK_M=BLOCK_M,
        BLOCK_G=BLOCK_G,
    )
    return out
