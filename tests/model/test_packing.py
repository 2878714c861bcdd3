"""Adapter weights packed by projection: the fused batch reads them as a view, with the
gradients `torch.stack`/`torch.cat` give; joins and leaves keep every value; and nothing a job
saves carries another job's weights."""

from __future__ import annotations

import io

import pytest
import torch
from tiny import tiny_llama
from torch import nn

from mixloom.model.adapter_model import AdapterModel
from mixloom.model.lora import stack_weights
from mixloom.model.packing import joined, repack
from mixloom.model.specs import AdapterSpec, LoraSpec


def _params(*shapes: tuple[int, ...], seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


@pytest.mark.parametrize("stacked", [True, False])
def test_joined_is_a_view_with_the_copys_values_and_gradients(stacked: bool) -> None:
    ps = _params((3, 5), (3, 5), (3, 5))
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    repack(ps)
    before = [p.detach().clone() for p in ps]
    view = joined(ps, stacked=stacked)
    assert view is not None and view.data_ptr() == ps[0].data_ptr()  # no copy
    copy = torch.stack(qs) if stacked else torch.cat(qs)
    torch.testing.assert_close(view, copy, rtol=0, atol=0)
    w = torch.randn(copy.shape[-1], 4)
    (view @ w).square().sum().backward()
    (copy @ w).square().sum().backward()
    for p, q, b in zip(ps, qs, before, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


def test_joined_without_grad_is_a_plain_view() -> None:
    ps = _params((2, 3, 4), (2, 3, 4))
    repack(ps)
    with torch.no_grad():
        view = joined(ps, stacked=False)
    assert view is not None and view.grad_fn is None and view.data_ptr() == ps[0].data_ptr()
    torch.testing.assert_close(view, torch.cat([p.detach() for p in ps]), rtol=0, atol=0)


def test_joined_declines_what_is_not_back_to_back_in_order() -> None:
    ps = _params((2, 4), (2, 4), (2, 4))
    assert joined(ps, stacked=True) is None  # each in its own memory
    repack(ps)
    assert joined(ps[::-1], stacked=True) is None  # out of order
    assert joined([ps[0], ps[2]], stacked=True) is None  # a gap
    assert joined(ps[1:], stacked=True) is not None  # a run of the block
    mixed = _params((2, 4), (3, 4), (2, 4))
    repack(mixed)
    assert joined(mixed, stacked=False) is None  # shapes differ: one block, no one view


def test_an_optimizer_step_on_a_packed_parameter_touches_only_its_own_slice() -> None:
    ps = _params((4, 3), (4, 3))
    repack(ps)
    other = ps[1].detach().clone()
    ps[0].grad = torch.ones_like(ps[0])
    torch.optim.AdamW([ps[0]], lr=0.1, fused=True).step()
    torch.testing.assert_close(ps[1].detach(), other, rtol=0, atol=0)
    view = joined(ps, stacked=True)
    assert view is not None
    torch.testing.assert_close(view[0], ps[0].detach(), rtol=0, atol=0)


def _spec(name: str, seed: int, r: int = 4) -> AdapterSpec:
    return AdapterSpec(
        name,
        kind="mixlora",
        lora=LoraSpec(r=r),
        num_experts=3,
        top_k=2,
        expert=LoraSpec(r=2),
        seed=seed,
    )


def test_joins_and_leaves_keep_every_value_and_repack_the_rest() -> None:
    model = AdapterModel(tiny_llama())
    for i, name in enumerate("abc"):
        model.add_adapter(_spec(name, seed=i))
    states = {n: model.adapter_state_dict(n) for n in "abc"}
    model.remove_adapter("b")
    model.add_adapter(_spec("d", seed=9, r=8))  # another rank: packed beside, not joined
    for n in "ac":
        for k, v in model.adapter_state_dict(n).items():
            torch.testing.assert_close(v, states[n][k], rtol=0, atol=0, msg=k)
    mlp = model.model.model.layers[1].mlp
    experts = [mlp.moe[n].experts["up_proj"] for n in "ac"]
    A, B = stack_weights(experts)  # type: ignore[arg-type]
    assert A.data_ptr() == experts[0].lora_A.data_ptr()
    assert B.data_ptr() == experts[0].lora_B.data_ptr()
    q = model.model.model.layers[0].self_attn.q_proj
    both = [q.adapters["a"], q.adapters["c"]]
    assert stack_weights(both)[0].data_ptr() == both[0].lora_A.data_ptr()
    with_d = [q.adapters["a"], q.adapters["d"]]  # ranks 4 and 8: zero-padded copy
    assert stack_weights(with_d)[0].shape == (2, 8, 64)


def test_what_a_job_saves_holds_its_own_weights_only() -> None:
    """Packed parameters are slices of memory shared with other tenants; a state dict or a
    saved file must not carry that memory along."""
    model = AdapterModel(tiny_llama())
    for i, name in enumerate("abc"):
        model.add_adapter(_spec(name, seed=i))
    state = model.adapter_state_dict("b")
    own = sum(v.numel() * v.element_size() for v in state.values())
    for k, v in state.items():
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
    buf = io.BytesIO()
    torch.save(state, buf)
    # torch.save writes whole storages: the packed blocks would be 3x `own` (three adapters);
    # the rest over `own` is the pickle's keys and tensor records
    assert own < buf.tell() < own * 1.5
