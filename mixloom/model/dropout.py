"""Dropout bits: the keep-decisions of one adapter's LoRA dropout, drawn so that a job's masks
depend only on its own stream (never on the other jobs of a batch, nor on padding).

Each decision reads 16 random bits: on a CPU from numpy's PCG64 seeded by the adapter's
stream (a host torch.Generator), on a GPU from the counter-based Philox kernel
(kernels.dropout_keep) keyed by a per-batch seed of the adapter. FusedState.dropout_keep
(model/batch.py) lays every job's mask of a projection out in one tensor; `keep_mask` is one
job's mask alone, the oracle the tests compare it with.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mixloom import kernels

DROP_BITS = 16  # random bits per dropout decision


def drop_count(p: float) -> int:
    return min(round(p * 2**DROP_BITS), 2**DROP_BITS - 1)


def dropout_scale(p: float) -> float:
    """The inverted-dropout factor 1 / (1 - p') of keep_mask's resolved probability p'."""
    return 1.0 / (1.0 - drop_count(p) / 2**DROP_BITS)


def threshold(p: float) -> int:
    """Keep a decision when its 16 random bits, read as int16, are at least this."""
    return drop_count(p) - 2 ** (DROP_BITS - 1)


def mix64(seed: int, n: int) -> int:
    """SplitMix64's output for state seed + (n + 1) * golden gamma, as a signed 64-bit int:
    the n-th seed derived from `seed` (host arithmetic, ~1 us)."""
    m = (1 << 64) - 1
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


def draw_seed(gen: torch.Generator) -> int:
    """A 63-bit seed from an adapter's stream (a host generator: no device work)."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=gen))


def on_device(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """`gen` itself on its own device; elsewhere a generator of `device` seeded from it (the
    adapters' streams live on the host, where drawing a seed waits for nothing)."""
    if gen.device.type == device.type:
        return gen
    return torch.Generator(device).manual_seed(draw_seed(gen))


def random_bits(gen: torch.Generator, count: int, device: torch.device) -> Tensor:
    """(count,) int16, uniform: 16 random bits per dropout decision, four per 64-bit word.

    The stream path (FusedState.dropout_keep's, where kernels.counter_dropout is off). On a
    CPU, `gen` (a Mersenne Twister) draws one 63-bit seed and numpy's PCG64 expands it into
    the words: a pure function of `gen`'s state, so checkpoints and fused-equals-alone hold.
    For 3.1M decisions on 2 CPU cores: bernoulli_ 13.2 ms, 16-bit words from `gen` 3.7 ms,
    from PCG64 1.3 ms. On a GPU without triton, a device generator seeded from `gen`.
    """
    n_words = (count + 3) // 4
    if device.type == "cpu":
        raw = np.random.PCG64(draw_seed(gen)).random_raw(n_words)  # uint64
        words = torch.from_numpy(raw.view(np.int64))
    else:
        words = torch.randint(
            -(2**63),
            2**63 - 1,
            (n_words,),
            dtype=torch.int64,
            generator=on_device(gen, device),
            device=device,
        )
    bits = words.view(torch.int16)
    return bits if bits.shape[0] == count else bits[:count]


def keep_mask(gen: torch.Generator, rows: int, cols: int, p: float, device: torch.device) -> Tensor:
    """(rows, cols) bool keep-decisions of dropout with probability p, drawn from `gen`: one
    job's mask alone (FusedState.dropout_keep draws the same for each job of a batch; with
    counter-based dropout, for the job's first mask of the batch).

    Each decision reads 16 random bits, so p is resolved to p' = round(p * 2**16) / 2**16
    (0.05 -> 0.0500030; see dropout_scale).
    """
    if kernels.counter_dropout(device):  # as an adapter's first mask of a batch
        seeds = torch.tensor([mix64(draw_seed(gen), 0)], device=device)
        job = torch.zeros(rows, dtype=torch.int32, device=device)
        local = torch.arange(rows, device=device)
        thresholds = torch.full((rows,), threshold(p), dtype=torch.int32, device=device)
        return kernels.dropout_keep(seeds, job, local, thresholds, cols)
    return random_bits(gen, rows * cols, device).view(rows, cols) >= threshold(p)
