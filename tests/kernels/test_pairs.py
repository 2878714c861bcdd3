"""The kernels' batch metadata: pairs sorted by group, group offsets and the tile table, vs
loops; built on device with no host sync."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixloom.kernels import group_pairs, row_blocks, tile_table


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a device value to the host (.item(), .tolist(), nonzero)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(s in name for s in self.SYNCING):
            raise AssertionError(f"host sync in the pair grouping: {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("G", [1, 5, 24])
def test_pairs_sorted_by_group(k: int, G: int):
    g = torch.Generator().manual_seed(G * 10 + k)
    T = 57
    groups = torch.randint(-1, G, (T, k), generator=g)
    weights = torch.rand(T, k, generator=g)
    with _NoHostSync():
        p = group_pairs(groups, G, weights=weights, with_tiles=True)
    pairs = [(int(groups[t, s]), t, s) for t in range(T) for s in range(k)]
    want = sorted(pairs, key=lambda q: q[0])  # stable: row-major order within a group
    assert p.num_pairs == T * k and p.order is not None and p.rows is not None
    assert [t * k + s for _, t, s in want] == p.order.tolist()
    assert [t for _, t, _ in want] == p.rows.tolist()
    assert [gg for gg, _, _ in want] == p.groups.tolist()  # type: ignore[union-attr]
    assert torch.equal(p.weights, weights.reshape(-1)[p.order])  # type: ignore[arg-type]
    counts = [sum(1 for gg, _, _ in pairs if gg == i) for i in range(G)]
    first = sum(1 for gg, _, _ in pairs if gg < 0)
    assert p.offsets.tolist() == [first + sum(counts[:i]) for i in range(G + 1)]
    assert p.tiles is not None and torch.equal(p.tiles, tile_table(p.offsets, T * k))


def test_pairs_of_given_rows():
    """Pairs listed one by one (a layer's jobs' real tokens): rows follow their pairs."""
    groups = torch.tensor([2, 0, -1, 0, 1])
    rows = torch.tensor([10, 11, 12, 13, 14])
    p = group_pairs(groups, 3, rows=rows)
    assert p.rows.tolist() == [12, 11, 13, 14, 10]  # type: ignore[union-attr]
    assert p.offsets.tolist() == [1, 3, 4, 5]


def test_row_blocks():
    p = row_blocks([0, 3, 3, 8], torch.device("cpu"), with_tiles=True)
    assert (p.num_pairs, p.num_groups, p.rows) == (8, 3, None)
    assert p.offsets.tolist() == [0, 3, 3, 8]
    assert p.tiles is not None and torch.equal(p.tiles, tile_table(p.offsets, 8))


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
