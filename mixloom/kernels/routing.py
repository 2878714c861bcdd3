"""Routing metadata: (row, top-k slot) pairs sorted by group, built on device with no host sync.

Built once per layer call and passed to every grouped matmul of that layer (gate, up, down of
every expert; q/k/v/o share one for attention LoRA). Pure torch: no triton import here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor


def interpret() -> bool:
    """Whether triton runs in its CPU interpreter (read when used: tests set it late)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_m() -> int:
    """Pairs per kernel tile (see segmented.py). 16 keeps interpreter tests small and exercises
    tile edges; 64 on a GPU (64 gathered rows x 128 features of bf16 is a 16 KiB tile)."""
    return int(os.environ.get("MIXLOOM_BLOCK_M", 16 if interpret() else 64))


@dataclass(frozen=True)
class Routing:
    """Pairs sorted by group. P = T * k pairs; pairs whose group is -1 come first and belong to
    no group ([0, offsets[0]) is then non-empty); every kernel skips them.

    Attributes:
        rows: (P,) int64, token row of each sorted pair.
        slots: (P,) int64, top-k slot of each sorted pair.
        order: (P,) int64, flat index rows * k + slots (gather per-pair values with
            `topk_weights.reshape(-1)[order]`).
        offsets: (G+1,) int64, group g owns sorted pairs [offsets[g], offsets[g+1]).
        tiles: (2, n_tiles) int32 tile table for the triton kernels, or None (torch backend).
    """

    rows: Tensor
    slots: Tensor
    order: Tensor
    offsets: Tensor
    tiles: Tensor | None

    @property
    def num_groups(self) -> int:
        return self.offsets.numel() - 1


def build_routing(groups: Tensor, num_groups: int, *, with_tiles: bool = False) -> Routing:
    """Sort the (row, slot) pairs of `groups` by group, on device, without a host sync.

    Args:
        groups: (T, k) int64, group of each (row, slot): for MixLoRA experts
            `first_group_of_job[job_of_row][:, None] + topk_expert`; for attention LoRA
            `job_of_row[:, None]`. -1 means "no group" (the pair is skipped). Values must be
            < num_groups.
        num_groups: G.
        with_tiles: also build the triton tile table.
    """
    T, k = groups.shape
    flat = groups.reshape(-1)  # (P,)
    sorted_g, order = torch.sort(flat, stable=True)  # (P,), (P,)
    bounds = torch.arange(num_groups + 1, device=groups.device, dtype=sorted_g.dtype)
    offsets = torch.searchsorted(sorted_g, bounds)  # (G+1,) first pair of each group
    tiles = tile_table(offsets, flat.numel()) if with_tiles else None
    return Routing(rows=order // k, slots=order % k, order=order, offsets=offsets, tiles=tiles)


def tile_table(offsets: Tensor, num_pairs: int, tile_m: int | None = None) -> Tensor:
    """Kernel tile table for group `offsets` (G+1,), built on device with no host sync.

    Returns: (2, cdiv(num_pairs, tile_m) + G) int32 (a host-known bound on the tile count):
    row 0 the group of each tile (-1 for padding tiles), row 1 the tile's first pair.
    """
    bm = tile_m or block_m()
    G = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]  # (G,)
    ntiles = (counts + bm - 1).div(bm, rounding_mode="floor")  # (G,)
    ends = torch.cumsum(ntiles, 0)  # (G,) one past each group's last tile
    max_tiles = -(-num_pairs // bm) + G
    t = torch.arange(max_tiles, device=offsets.device)  # (n_tiles,)
    if G == 0:
        return torch.stack([torch.full_like(t, -1), t]).to(torch.int32)
    g = torch.searchsorted(ends, t, right=True)  # (n_tiles,) == G for padding tiles
    gc = g.clamp(max=G - 1)
    start = offsets[gc] + (t - (ends[gc] - ntiles[gc])) * bm
    group = torch.where(g < G, g, -1)
    return torch.stack([group, start]).to(torch.int32)
