"""What the kernels take besides activations: the batch's pairs sorted by group (GroupedPairs,
one metadata object per layer call) and one projection's LoRA weights of every group
(LoraStack).

GroupedPairs is built once per layer call (group_pairs, on device with no host sync; row_blocks,
on the host, for contiguous row blocks) and passed to every grouped matmul of that call: gate,
up and down of every expert, or q/k/v/o of attention LoRA. Pure torch: no triton import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class LoraStack(NamedTuple):
    """One projection's LoRA of every group, zero beyond each group's rank."""

    A: Tensor  # (G, R, H)
    B: Tensor  # (G, N, R)
    scale: Tensor  # (G,) fp32


@dataclass(frozen=True)
class GroupedPairs:
    """P pairs sorted by group; group g owns pairs [offsets[g], offsets[g+1]). Pairs whose group
    is -1 sort first and belong to no group ([0, offsets[0]) is then non-empty): every kernel
    gives them 0 and skips them.

    Attributes:
        offsets: (G+1,) int64.
        num_pairs: P (host).
        rows: (P,) int64 input row of each sorted pair, or None: pair p is row p (P rows laid
            out in group order already: row_blocks).
        weights: (P,) routing weight of each sorted pair (differentiable), or None.
        groups: (P,) int64 group of each sorted pair (-1 first), or None (row_blocks).
        order: (P,) int64 position of each sorted pair in the unsorted list (gather values made
            in the unsorted order with `values.index_select(0, order)`), or None (row_blocks).
        tiles: (2, n_tiles) int32 tile table of the triton kernels (tile_table), or None: a
            triton launch then builds its own, per call.
    """

    offsets: Tensor
    num_pairs: int
    rows: Tensor | None = None
    weights: Tensor | None = None
    groups: Tensor | None = None
    order: Tensor | None = None
    tiles: Tensor | None = None

    @property
    def num_groups(self) -> int:
        return self.offsets.numel() - 1


def group_pairs(
    groups: Tensor,
    num_groups: int,
    *,
    rows: Tensor | None = None,
    weights: Tensor | None = None,
    with_tiles: bool = False,
) -> GroupedPairs:
    """Sort pairs by group, on device, without a host sync (stable: pairs of a group keep their
    order).

    Args:
        groups: (T, k) int64 group of each (row, top-k slot): for MixLoRA experts
            `first_group_of_job[job_of_row][:, None] + topk_expert`; for attention LoRA
            `job_of_row[:, None]`. Or (P,): one pair each, in any order. -1 means "no group"
            (the pair is skipped); other values must be < num_groups.
        num_groups: G.
        rows: (P,) int64 input row of each pair, in the order of `groups`; default: row t of
            a (T, k) `groups` (pair p of a (P,) one).
        weights: (T, k) or (P,) routing weight of each pair, in the order of `groups`.
        with_tiles: also build the triton tile table.
    """
    k = groups.shape[1] if groups.dim() == 2 else 1
    flat = groups.reshape(-1)  # (P,)
    sorted_groups, order = torch.sort(flat, stable=True)  # (P,), (P,)
    bounds = torch.arange(num_groups + 1, device=groups.device, dtype=sorted_groups.dtype)
    offsets = torch.searchsorted(sorted_groups, bounds)  # (G+1,) first pair of each group
    P = flat.numel()
    return GroupedPairs(
        offsets=offsets,
        num_pairs=P,
        rows=_sorted_rows(rows, order, k),
        weights=None if weights is None else weights.reshape(-1).index_select(0, order),
        groups=sorted_groups,
        order=order,
        tiles=tile_table(offsets, P) if with_tiles else None,
    )


def _sorted_rows(rows: Tensor | None, order: Tensor, k: int) -> Tensor:
    """The row of each sorted pair: rows[order]; without rows, pair t * k + s's row t."""
    if rows is not None:
        return rows.index_select(0, order)
    return order if k == 1 else order // k


def row_blocks(
    offsets: list[int], device: torch.device, *, with_tiles: bool = False
) -> GroupedPairs:
    """Pairs that are rows already laid out in group order (plain LoRA over a fused batch:
    job g owns rows [offsets[g], offsets[g+1])): offsets (and the tile table) built on the host
    and uploaded without waiting for the device."""
    host = torch.tensor(offsets)
    tiles = _upload(tile_table(host, offsets[-1]), device) if with_tiles else None
    return GroupedPairs(offsets=_upload(host, device), num_pairs=offsets[-1], tiles=tiles)


def _upload(t: Tensor, device: torch.device) -> Tensor:
    """A plain copy from pageable memory waits for the device's queue; from pinned memory it
    does not."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def tile_table(offsets: Tensor, num_pairs: int, tile_m: int | None = None) -> Tensor:
    """Kernel tile table for group `offsets` (G+1,), built where offsets are, with no host sync.

    Args:
        tile_m: pairs per tile; default: the triton kernels' (common.tiles().block_m).
    Returns: (2, cdiv(num_pairs, tile_m) + G) int32 (a host-known bound on the tile count):
    row 0 the group of each tile (-1 for padding tiles), row 1 the tile's first pair.
    """
    if tile_m is None:
        from mixloom.kernels.common import tiles

        tile_m = tiles().block_m
    G = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]  # (G,)
    ntiles = (counts + tile_m - 1).div(tile_m, rounding_mode="floor")  # (G,)
    ends = torch.cumsum(ntiles, 0)  # (G,) one past each group's last tile
    max_tiles = -(-num_pairs // tile_m) + G
    t = torch.arange(max_tiles, device=offsets.device)  # (n_tiles,)
    if G == 0:
        return torch.stack([torch.full_like(t, -1), t]).to(torch.int32)
    g = torch.searchsorted(ends, t, right=True)  # (n_tiles,) == G for padding tiles
    gc = g.clamp(max=G - 1)
    start = offsets[gc] + (t - (ends[gc] - ntiles[gc])) * tile_m
    group = torch.where(g < G, g, -1)
    return torch.stack([group, start]).to(torch.int32)
