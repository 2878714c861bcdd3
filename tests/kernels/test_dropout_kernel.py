"""The counter-based dropout kernel (kernels/dropout.py): Philox as published, the kernel
equal to its numpy oracle bit for bit, and each row's mask a function of its own job's seed
and its own index only."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mixloom.kernels import dropout_keep, reference
from mixloom.kernels.dropout import KEY

# bench/gpu.sh runs these on the GPU (TRITON_INTERPRET=0): the kernel then gets CUDA tensors
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def test_reference_philox_gives_random123s_known_answers() -> None:
    # Philox4x32-10 known-answer vectors (Random123's kat_vectors).
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, words in cases:
        got = reference.philox4x32(np.array([counter], dtype=np.uint32), key)[0]
        assert tuple(int(w) for w in got) == words


def _inputs(rows: int, J: int, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(-(2**63), 2**63 - 1, (J,), generator=g)
    job = torch.randint(0, J, (rows,), generator=g).to(torch.int32)
    local = torch.randint(0, 2**40, (rows,), generator=g)  # counters past 32 bits too
    thresholds = torch.randint(-(2**15), 2**15 + 1, (rows,), generator=g).to(torch.int32)
    return seeds.to(DEVICE), job.to(DEVICE), local.to(DEVICE), thresholds.to(DEVICE)


@pytest.mark.parametrize(
    ("rows", "cols", "J"),
    [
        (37, 45, 3),
        (5, 8, 1),
        (300, 130, 4),
        (3, 1, 2),
        (0, 10, 1),
        (4, 0, 2),
    ],  # 300: 2 x 2 programs
)
def test_kernel_equals_numpy_philox(rows: int, cols: int, J: int) -> None:
    seeds, job, local, thresholds = _inputs(rows, J)
    got = dropout_keep(seeds, job, local, thresholds, cols)
    want = reference.philox_keep(seeds, job, local, thresholds, cols, KEY)
    assert got.dtype == torch.bool and got.shape == (rows, cols)
    assert torch.equal(got, want)


def test_thresholds_at_the_ends_keep_all_and_none() -> None:
    seeds, job, local, _ = _inputs(20, 2)
    always = torch.full((20,), -(2**15), dtype=torch.int32, device=DEVICE)
    never = torch.full((20,), 2**15, dtype=torch.int32, device=DEVICE)
    assert dropout_keep(seeds, job, local, always, 33).all()
    assert not dropout_keep(seeds, job, local, never, 33).any()


def test_a_rows_mask_depends_on_its_seed_and_index_only() -> None:
    seeds, job, local, thresholds = _inputs(24, 3)
    keep = dropout_keep(seeds, job, local, thresholds, 40)
    # other jobs' seeds changed, rows shuffled: each row's own mask is unchanged
    others = seeds.clone()
    others[1:] += 12345
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    moved = dropout_keep(others, job[perm], local[perm], thresholds[perm], 40)
    of_job0 = job[perm] == 0
    assert torch.equal(moved[of_job0], keep[perm][of_job0])
    assert not torch.equal(moved[~of_job0], keep[perm][~of_job0])


def test_drop_rate_is_the_thresholds_probability() -> None:
    # p = 0.1 on the int16 scale (layers._threshold): 6,554 of 65,536 bit patterns drop
    rows, cols = 64, 256
    seeds = torch.tensor([7, -3], dtype=torch.int64, device=DEVICE)
    job = torch.arange(rows, dtype=torch.int32, device=DEVICE) % 2
    local = torch.arange(rows, device=DEVICE) // 2
    thresholds = torch.full((rows,), 6554 - 2**15, dtype=torch.int32, device=DEVICE)
    keep = dropout_keep(seeds, job, local, thresholds, cols)
    dropped = 1 - keep.float().mean().item()  # 16,384 decisions: sd 0.0023
    assert abs(dropped - 0.1) < 0.012, dropped
    # and no lane of the eight a Philox call yields is stuck
    per_lane = 1 - keep.float().view(rows, cols // 8, 8).mean((0, 1))
    assert ((per_lane > 0.05) & (per_lane < 0.15)).all(), per_lane
