"""Dropout masks of a fused batch: every job's block is exactly the mask it would draw alone,
from its own stream, whatever else shares the batch and however wide the batch is padded.
Both ways of drawing: from each job's stream (the CPU's), and the counter-based kernel fed one
seed per job (the GPU's; here in triton's interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

from mixloom.model.batch import FusedState, Segment
from mixloom.model.dropout import keep_mask


@pytest.fixture(params=["stream", "counter"], autouse=True)
def rng(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "counter" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("the counter-based kernel on CPU needs TRITON_INTERPRET=1 (scripts/test.sh)")
    monkeypatch.setenv("MIXLOOM_DROPOUT_RNG", request.param)
    return request.param  # type: ignore[no-any-return]


def _generators(seed: int = 0) -> dict[str, torch.Generator]:
    return {name: torch.Generator().manual_seed(seed + i) for i, name in enumerate("abc")}


def test_batch_mask_equals_each_jobs_own_mask_with_padding_and_non_dropping_jobs() -> None:
    per_seq, cols = 5, 12
    segments = [Segment("a", 0, 2), Segment("b", 2, 3), Segment("c", 3, 5)]
    token_mask = torch.ones(5, per_seq, dtype=torch.bool)
    token_mask[1, 3:] = False  # job a pads its second row
    token_mask[4, 1:] = False  # job c pads its second row
    st = FusedState(generators=_generators())
    st.begin(segments, token_mask, training=True, collect_router=False)
    parts = [
        ("a", 2 * per_seq, 0.3, segments[0]),
        ("b", 1 * per_seq, 0.0, segments[1]),  # does not drop: keeps all, draws nothing
        ("c", 2 * per_seq, 0.5, segments[2]),
    ]
    keep = st.dropout_keep(parts, cols, torch.device("cpu"))
    assert keep is not None and keep.shape == (5 * per_seq, cols)

    alone = _generators()  # the same streams, drawn job by job
    for (name, rows, p, seg), lo in zip(parts, (0, 10, 15), strict=True):
        block = keep[lo : lo + rows]
        real = token_mask[seg.start : seg.end].reshape(-1)
        if p == 0.0:
            assert block.all()
            continue
        own = keep_mask(alone[name], int(real.sum()), cols, p, torch.device("cpu"))
        assert torch.equal(block[real], own), name
        assert not block[~real].any(), f"{name}: padding rows are dropped"
        # and each stream moved on exactly as far as drawing alone moved it
        assert torch.equal(st.generators[name].get_state(), alone[name].get_state())
    assert torch.equal(st.generators["b"].get_state(), _generators()["b"].get_state())


def test_drop_rates_are_each_jobs_p() -> None:
    st = FusedState(generators=_generators())
    st.begin([Segment("a", 0, 1), Segment("c", 1, 2)], None, training=True, collect_router=False)
    keep = st.dropout_keep([("a", 400, 0.3, None), ("c", 400, 0.05, None)], 64, torch.device("cpu"))
    assert keep is not None
    dropped = 1 - keep.float().view(2, -1).mean(1)  # 25,600 decisions each: sd < 0.003
    assert abs(dropped[0] - 0.3) < 0.015 and abs(dropped[1] - 0.05) < 0.008, dropped


def test_no_mask_when_nothing_drops() -> None:
    st = FusedState(generators=_generators())
    st.begin([Segment("a", 0, 1)], None, training=True, collect_router=False)
    assert st.dropout_keep([("a", 4, 0.0, None)], 8, torch.device("cpu")) is None
    st.begin([Segment("a", 0, 1)], None, training=False, collect_router=False)
    assert st.dropout_keep([("a", 4, 0.5, None)], 8, torch.device("cpu")) is None


def test_a_jobs_later_masks_do_not_depend_on_what_others_drew_between() -> None:
    cpu = torch.device("cpu")
    together = FusedState(generators=_generators())
    together.begin(
        [Segment("a", 0, 1), Segment("c", 1, 2)], None, training=True, collect_router=False
    )
    first = together.dropout_keep([("a", 6, 0.3, None)], 16, cpu)
    together.dropout_keep([("c", 6, 0.3, None)], 16, cpu)  # a projection only c adapts
    both = together.dropout_keep([("a", 6, 0.3, None), ("c", 6, 0.5, None)], 16, cpu)

    alone = FusedState(generators=_generators())
    alone.begin([Segment("a", 0, 1)], None, training=True, collect_router=False)
    own_first = alone.dropout_keep([("a", 6, 0.3, None)], 16, cpu)
    own_second = alone.dropout_keep([("a", 6, 0.3, None)], 16, cpu)
    assert first is not None and both is not None
    assert torch.equal(first, own_first) and torch.equal(both[:6], own_second)
    assert not torch.equal(own_first, own_second)  # successive masks differ
