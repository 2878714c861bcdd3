"""Adapter weights packed by projection: every adapter's A of one projection (or its B, or its
router) lives in one block of memory, back to back in the order the adapters joined. A fused
batch of those adapters then reads them as one (G, ...) tensor that is a view of the block,
where `torch.stack`/`torch.cat` would copy every weight of every job, per projection per
forward (and again per recomputation): at the LLaMA-2-7B shape, 25 MB a MixLoRA job a layer,
0.8 GB a layer read and written for sixteen jobs.

Each adapter keeps its own `nn.Parameter` (optimizer, state dicts and exports see no
difference); only its memory moves into the block. The packed view's gradient is handed back
to each parameter as a slice, as `torch.cat`'s backward does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def repack(params: Sequence[nn.Parameter]) -> None:
    """Move the parameters into one new block of memory, each a contiguous slice of it, in
    this order. Their values, identities and gradients do not change. Parameters of several
    shapes may share a block; a mix of dtypes or devices is left as it is."""
    if len(params) < 2:
        return
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device for p in params):
        return
    with torch.no_grad():
        block = torch.cat([p.detach().reshape(-1) for p in params])
    at = 0
    for p in params:
        p.data = block[at : at + p.numel()].view(p.shape)
        at += p.numel()


def joined(params: Sequence[Tensor], *, stacked: bool) -> Tensor | None:
    """`torch.stack(params)` (stacked) or `torch.cat(params)` as a view, with the same
    gradients, when the parameters lie back to back in one block in this order and share one
    shape; None otherwise (the caller copies)."""
    first = params[0]
    shape, dtype, ptr = first.shape, first.dtype, first.data_ptr()
    step = first.numel() * first.element_size()
    for i, p in enumerate(params):
        if p.data_ptr() != ptr + i * step or p.shape != shape or p.dtype != dtype:
            return None
        if not p.is_contiguous():
            return None
    # back to back in memory and all inside the first one's block: one block
    end = (first.storage_offset() + len(params) * first.numel()) * first.element_size()
    if end > first.untyped_storage().nbytes():
        return None
    if not torch.is_grad_enabled():  # e.g. a forward whose activations are recomputed later
        return first.as_strided(
            *_layout(len(params), tuple(shape), stacked), first.storage_offset()
        )
    return _Joined.apply(stacked, *params)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=1024)
def _layout(count: int, shape: tuple[int, ...], stacked: bool) -> tuple[tuple[int, ...], ...]:
    """(size, strides) of `count` contiguous `shape` tensors stacked, or concatenated on dim 0."""
    size = (count, *shape) if stacked else (count * shape[0], *shape[1:])
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return size, tuple(reversed(strides))


class _Joined(torch.autograd.Function):
    """(J, *shape) or (J * shape[0], *shape[1:]) view over J back-to-back parameters."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, stacked: bool, *params: Tensor) -> Tensor:  # type: ignore[override]
        first = params[0]
        ctx.stacked, ctx.rows = stacked, first.shape[0]  # type: ignore[attr-defined]
        layout = _layout(len(params), tuple(first.shape), stacked)
        return first.as_strided(*layout, first.storage_offset())

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        parts = grad.unbind(0) if ctx.stacked else grad.split(ctx.rows)  # type: ignore[attr-defined]
        return (None, *parts)
