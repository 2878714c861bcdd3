"""Routing metadata: sorted (row, slot) pairs, group offsets and the tile table, vs loops."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixloom.kernels import build_routing, tile_table


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a device value to the host (.item(), .tolist(), nonzero)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(s in name for s in self.SYNCING):
            raise AssertionError(f"host sync in the routing path: {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("G", [1, 5, 24])
def test_routing_sorts_pairs_by_group(k: int, G: int):
    g = torch.Generator().manual_seed(G * 10 + k)
    T = 57
    groups = torch.randint(-1, G, (T, k), generator=g)
    with _NoHostSync():
        r = build_routing(groups, G, with_tiles=True)
    pairs = [(int(groups[t, s]), t, s) for t in range(T) for s in range(k)]
    want = sorted(pairs, key=lambda p: p[0])  # stable: row-major order within a group
    assert [(t, s) for _, t, s in want] == list(zip(r.rows.tolist(), r.slots.tolist(), strict=True))
    assert (r.order == r.rows * k + r.slots).all()
    counts = [sum(1 for gg, _, _ in pairs if gg == i) for i in range(G)]
    first = sum(1 for gg, _, _ in pairs if gg < 0)
    assert r.offsets.tolist() == [first + sum(counts[:i]) for i in range(G + 1)]


@pytest.mark.parametrize("tile_m", [16, 64])
def test_tile_table_covers_every_pair_once(tile_m: int):
    counts = [0, 17, 16, 1, 0, 40, 0]
    offsets = torch.tensor([3] + counts).cumsum(0)  # 3 leading pairs outside every group
    P = int(offsets[-1])
    with _NoHostSync():
        tiles = tile_table(offsets, P, tile_m)
    assert tiles.shape == (2, -(-P // tile_m) + len(counts))
    seen = []
    for group, start in tiles.t().tolist():
        if group < 0:
            continue
        end = min(start + tile_m, int(offsets[group + 1]))
        assert int(offsets[group]) <= start < end
        seen.extend(range(start, end))
    assert sorted(seen) == list(range(3, P))


def test_tile_table_without_groups():
    tiles = tile_table(torch.zeros(1, dtype=torch.int64), 10, 16)
    assert (tiles[0] == -1).all()
