"""What a fused batch is to the layers: its row blocks (`Segment`, one per job), its padding,
training or not, per-batch caches, each job's dropout draws, and the recomputation of adapter
activations in the backward (`FusedState.recomputed`, `_Recompute`).

One FusedState is shared by every wrapped layer of a model (model/lora.py, model/moe.py). A
batch is (B, T) tokens; its rows are laid out as contiguous blocks of whole sequences, one
block per job, so each job's tokens are the flattened rows [start * T, end * T).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from mixloom import kernels
from mixloom.model.dropout import (
    DROP_BITS,
    draw_seed,
    dropout_scale,
    mix64,
    on_device,
    random_bits,
    threshold,
)

if TYPE_CHECKING:
    from mixloom.model.routing import RouterLog


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the batch belong to adapter `name` (None: base model only)."""

    name: str | None
    start: int
    end: int


_T = TypeVar("_T")


@dataclass(frozen=True)
class TokenShare:
    """What this process holds of one job's micro-batch when the batch is split across
    processes (data parallel: trainer/distributed.py): the index of each of its real tokens
    among the whole micro-batch's real tokens (batch order), and how many those are. Random
    draws per token (dropout, router jitter) are drawn for the whole micro-batch, as one
    process would, and this process keeps its own tokens' rows of them."""

    index: Tensor  # (n_local,) int64, host
    total: int

    def rows(self, per_token: int) -> tuple[Tensor, int]:
        """(the index of each of this process's rows among the whole micro-batch's, their
        count) for rows that come `per_token` to a real token, token-major (a MixLoRA job's
        (token, slot) pairs)."""
        if per_token == 1:
            return self.index, self.total
        slot = torch.arange(per_token)
        return (self.index[:, None] * per_token + slot).reshape(-1), self.total * per_token


@dataclass
class _Snapshot:
    batch: tuple[Any, ...]  # FusedState._batch(): the batch, its caches and dropout seeds
    streams: dict[str, Tensor]  # adapter name -> its dropout stream's state


@dataclass
class FusedState:
    """What the wrapped layers need to know about the batch being run. Shared by all layers."""

    segments: list[Segment] | None = None
    token_mask: Tensor | None = None  # (B, T) bool: real (non-padding) tokens
    training: bool = False
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # dropout/jitter streams
    router_logs: list[RouterLog] | None = None  # collected when not None
    backend: str = "torch"
    # Adapter activations (MixLoRA experts, dropout-masked LoRA inputs) recomputed in the
    # backward instead of kept (see recomputed); False keeps them (faster on a CPU, more memory).
    recompute: bool = True

    _real: dict[Segment, Tensor] = field(default_factory=dict)  # per-batch caches
    _consts: dict[tuple[object, ...], Any] = field(default_factory=dict)
    _host_mask: Tensor | None = None
    # counter-based dropout: each adapter's seed for this batch (one draw from its stream),
    # and how many masks it has drawn in this batch
    _seeds: dict[str, int] = field(default_factory=dict)
    _draws: dict[str, int] = field(default_factory=dict)
    # data parallel: each job's share of its micro-batch in this process (none: all of it)
    shares: dict[str, TokenShare] = field(default_factory=dict)

    def begin(
        self,
        segments: list[Segment],
        attention_mask: Tensor | None,
        *,
        training: bool,
        collect_router: bool,
        host_mask: Tensor | None = None,
        shares: dict[str, TokenShare] | None = None,
    ) -> None:
        """Describe the batch the next forwards run over. `host_mask`: the attention mask as
        the host has it, when the caller does: the layers read padding from it, where
        reading the device's copy would wait for the GPU to finish everything queued.
        `shares`: the jobs whose rows here are a share of their micro-batch (TokenShare)."""
        self.shares = shares or {}
        self.segments = segments
        self.token_mask = attention_mask.bool() if attention_mask is not None else None
        self.training = training
        self.router_logs = [] if collect_router else None
        self._real = {}
        self._consts = {}
        self._host_mask = host_mask.bool() if host_mask is not None else None
        self._seeds, self._draws = {}, {}

    def end(self) -> None:
        """Back to plain base-model behaviour (router logs stay readable until next begin)."""
        self.segments = None
        self.token_mask = None
        self.training = False
        self._real = {}
        self._consts = {}
        self._host_mask = None
        self._seeds, self._draws = {}, {}
        self.shares = {}

    def real_tokens(self, seg: Segment, per_seq: int, device: torch.device) -> Tensor:
        """(n_real,) indices of the segment's non-padding tokens within its flattened rows."""
        if seg not in self._real:
            n = (seg.end - seg.start) * per_seq
            if self.token_mask is None:
                self._real[seg] = torch.arange(n, device=device)
            else:
                self._real[seg] = upload(self.real_tokens_host(seg), device)
        return self._real[seg]

    def real_tokens_host(self, seg: Segment, per_seq: int | None = None) -> Tensor:
        """real_tokens, on the host (it is known there: no device read)."""
        if self.token_mask is None:
            assert per_seq is not None
            return torch.arange((seg.end - seg.start) * per_seq)
        return torch.nonzero(self._host_real(seg)).squeeze(1)

    def _host_real(self, seg: Segment) -> Tensor:
        """(rows,) bool on the host: which of the segment's flattened rows are real tokens."""
        assert self.token_mask is not None
        if self._host_mask is None:  # once a batch, unless begin() was given the host's copy
            self._host_mask = self.token_mask.cpu()
        return self._host_mask[seg.start : seg.end].reshape(-1)

    def dropout_keep(
        self,
        parts: list[tuple[str, int, float, Segment | None]],
        cols: int,
        device: torch.device,
    ) -> Tensor | None:
        """(sum of rows, cols) bool keep-decisions of consecutive row blocks, one per part
        (adapter name, rows, dropout p, its batch segment when the rows are its tokens, None
        for pair rows); None when no part drops (not training, or every p == 0).

        Each part draws from its adapter's own stream exactly what `keep_mask` draws for
        it alone, so a job's masks never depend on the other jobs. A part's padding rows
        are dropped, and bits are drawn for its real tokens only, so its masks do not depend
        on how wide the fused batch is padded either. Parts that do not drop keep every row
        and draw nothing. All parts are compared with their thresholds in one op, not one
        per job: on a GPU every op is a launch, and this runs for every projection.

        On a GPU (kernels.counter_dropout) one kernel writes every part's mask (Philox,
        keyed by a seed of the part's adapter and each row's index among its part's real
        rows): one launch a projection, not one per job, with the same independence from
        the other jobs and from padding. An adapter draws one seed a batch from its stream
        (`mask_seed`), and its n-th mask of the batch uses that seed mixed with n: no
        device work and no per-job op on the host either. A replay passes the same seeds.

        The inverted-dropout factor (`dropout_scale`) is not applied here: the LoRA layers
        fold it into their scale, which saves a full pass over the input
        (scale * B @ A @ (x * keep / q) == (scale / q) * B @ A @ (x * keep)).
        """
        if not any(self.dropping(p) for _, _, p, _ in parts):
            return None
        key = (
            "drop",
            tuple((rows, p if self.dropping(p) else 0.0, seg) for _, rows, p, seg in parts),
        )
        thresholds = self.cached(key, lambda: upload(self._thresholds(parts), device))
        if kernels.counter_dropout(device):
            seeds = [self.mask_seed(name) if self.dropping(p) else 0 for name, _, p, _ in parts]
            job, local = self.cached(
                key + ("rows",), lambda: tuple(upload(t, device) for t in self._counter_rows(parts))
            )
            return kernels.dropout_keep(upload(seeds, device), job, local, thresholds, cols)
        bits = []
        for name, rows, p, seg in parts:
            if not self.dropping(p):  # any bits: its threshold keeps everything
                bits.append(torch.empty(rows * cols, dtype=torch.int16, device=device))
                continue
            real = self.real_tokens(seg, rows // (seg.end - seg.start), device) if seg else None
            n = rows if real is None else real.shape[0]
            share = self._share_rows(name, n, seg)
            if share is None:
                drawn = random_bits(self.generators[name], n * cols, device)
            else:  # the whole micro-batch's draw, this process's rows of it
                index, total = share
                drawn = random_bits(self.generators[name], total * cols, device).view(total, cols)
                drawn = drawn.index_select(0, upload(index, device)).view(-1)
            if n != rows:  # padding rows get any bits; their threshold drops them
                assert real is not None
                block = drawn.new_empty(rows, cols).index_copy_(0, real, drawn.view(n, cols))
                drawn = block.view(-1)
            bits.append(drawn)
        flat = bits[0] if len(bits) == 1 else torch.cat(bits)
        return flat.view(-1, cols) >= thresholds[:, None]

    def _thresholds(self, parts: list[tuple[str, int, float, Segment | None]]) -> Tensor:
        """(sum of rows,) int32: a row is kept when its 16 random bits (int16) reach it."""
        never, always = 2 ** (DROP_BITS - 1), -(2 ** (DROP_BITS - 1))
        out = []
        for _, rows, p, seg in parts:
            if not self.dropping(p):
                out.append(torch.full((rows,), always, dtype=torch.int32))
                continue
            t = torch.full((rows,), threshold(p), dtype=torch.int32)
            if seg is not None and self.token_mask is not None:
                t = torch.where(self._host_real(seg), t, never)
            out.append(t)
        return torch.cat(out)

    def mask_seed(self, name: str) -> int:
        """The seed of adapter `name`'s next counter-based mask in this batch: its batch
        seed (drawn from its stream at its first mask of the batch) mixed with the number
        of masks it has drawn since. Depends on this adapter's masks only, not on which
        other jobs share the batch or what they draw."""
        if name not in self._seeds:
            self._seeds[name] = draw_seed(self.generators[name])
        n = self._draws.get(name, 0)
        self._draws[name] = n + 1
        return mix64(self._seeds[name], n)

    def _counter_rows(
        self, parts: list[tuple[str, int, float, Segment | None]]
    ) -> tuple[Tensor, Tensor]:
        """(sum of rows,) int32 part of each row, and (sum of rows,) int64 index of each row
        among its part's real rows (padding rows: any; their threshold drops them)."""
        jobs, local = [], []
        for j, (name, rows, p, seg) in enumerate(parts):
            jobs.append(torch.full((rows,), j, dtype=torch.int32))
            if seg is not None and self.token_mask is not None and self.dropping(p):
                index = (self._host_real(seg).cumsum(0) - 1).clamp(min=0)
            else:
                index = torch.arange(rows)
            share = self._share_rows(name, rows, seg) if self.dropping(p) else None
            if share is not None:  # each row's index in the whole micro-batch instead
                index = share[0][index]
            local.append(index)
        return torch.cat(jobs), torch.cat(local)

    def _share_rows(self, name: str, rows: int, seg: Segment | None) -> tuple[Tensor, int] | None:
        """For a job whose micro-batch is shared across processes: the index of each of a
        dropout part's `rows` among the whole micro-batch's, and their count. A part is the
        job's real tokens (`seg` given) or its (token, slot) pairs (`seg` None)."""
        share = self.shares.get(name)
        if share is None:
            return None
        tokens = share.index.shape[0]
        return share.rows(1 if seg is not None else rows // max(1, tokens))

    def dropping(self, p: float) -> bool:
        """Whether a dropout of probability p is applied in this batch."""
        return self.training and p > 0.0

    def dropout_factor(self, p: float) -> float:
        """What a LoRA with dropout p multiplies its scale by in this batch: 1 / (1 - p')
        while training (p' as keep_mask resolves it), 1 otherwise."""
        return dropout_scale(p) if self.dropping(p) else 1.0

    def cached(self, key: tuple[object, ...], build: Callable[[], _T]) -> _T:
        """A small tensor (group offsets, scales), or host-side layout, built once per batch,
        not once per layer."""
        if key not in self._consts:
            self._consts[key] = build()
        return self._consts[key]  # type: ignore[no-any-return]

    def recomputed(self, dropping: list[str], run: Callable[..., Any], *inputs: Tensor) -> Any:
        """run(*inputs), keeping only `inputs` for the backward, which runs `run` again
        (_Recompute), while training with `recompute` set; plainly otherwise. `dropping`:
        the adapters whose dropout streams `run` draws from (redrawn alike the second time).
        `run` must read the batch only through this state and its arguments."""
        if not (self.recompute and torch.is_grad_enabled()):
            return run(*inputs)
        snap = self.snapshot(dropping)
        # The outputs must require grad even when no input does (a first layer's x): the
        # adapter weights inside are reached through `run`, and get their grads there.
        anchor = torch.empty(0, device=inputs[0].device, requires_grad=True)
        return _Recompute.apply(run, lambda: self.replaying(snap), anchor, *inputs)

    def snapshot(self, names: list[str]) -> _Snapshot:
        """What a later recomputation of this batch's adapter math needs to see the batch as
        the forward did: the batch's description and caches (the batch may have ended by
        then), and where the named adapters' dropout streams are now."""
        batch = self._batch()
        return _Snapshot(
            batch=(*batch[:-2], dict(self._seeds), dict(self._draws)),  # these move on: copies
            # an adapter with a batch seed draws no more from its stream in this batch
            streams={
                name: self.generators[name].get_state() for name in names if name not in self._seeds
            },
        )

    @contextmanager
    def replaying(self, snap: _Snapshot) -> Iterator[None]:
        """Within: the batch is as it was at `snap`, and the named adapters draw from copies
        of their streams set back to it, so a recomputation (in the backward, after the
        batch has ended) redraws the same masks; the streams themselves stay put."""
        real = {name: self.generators[name] for name in snap.streams}
        now = self._batch()
        for name, state in snap.streams.items():
            copy = torch.Generator(device=real[name].device)
            copy.set_state(state)
            self.generators[name] = copy
        self._set_batch(snap.batch)
        self._seeds, self._draws = dict(self._seeds), dict(self._draws)  # the replay's own
        try:
            yield
        finally:
            self.generators.update(real)
            self._set_batch(now)

    # what describes a batch to the layers: saved by snapshot, set back by replaying
    _BATCH = (
        "training",
        "token_mask",
        "_host_mask",
        "_real",
        "_consts",
        "shares",
        "_seeds",
        "_draws",
    )

    def _batch(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._BATCH)

    def _set_batch(self, batch: tuple[Any, ...]) -> None:
        for name, value in zip(self._BATCH, batch, strict=True):
            setattr(self, name, value)

    def jitter(self, name: str, x: Tensor, eps: float) -> Tensor:
        if not self.training or eps == 0.0:
            return x
        gen = on_device(self.generators[name], x.device)
        share = self.shares.get(name)
        if share is None:
            noise = torch.rand(x.shape, generator=gen, device=x.device)
        else:  # x: this process's real tokens; the draw: the whole micro-batch's
            whole = torch.rand((share.total, *x.shape[1:]), generator=gen, device=x.device)
            noise = whole.index_select(0, upload(share.index, x.device))
        return x * (noise * (2 * eps) + (1.0 - eps)).to(x.dtype)


def upload(values: Tensor | list[float] | list[int], device: torch.device) -> Tensor:
    """A small host tensor (or list) on `device` without waiting for the device's queue: a
    plain copy from pageable memory synchronises; from pinned memory it is asynchronous."""
    t = values if isinstance(values, Tensor) else torch.tensor(values)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _Recompute(torch.autograd.Function):
    """Runs adapter math without keeping its activations: the forward saves only its inputs,
    and the backward runs it again, under autograd, and back-propagates through that.

    Used for the MixLoRA experts of an FFN call (kept otherwise, per token and top-2: the
    gathered LoRA inputs, g, u and z of both pairs (6 x I), the dropout-masked copies and
    their masks, the stacked expert weights; kept instead: x, the frozen gate and up, the
    routing weights) and for dropout-masked LoRA inputs (kept otherwise: a masked copy of x
    and its mask per projection; instead: x, shared by q, k and v). What comes back costs
    the adapters' LoRA matmuls and elementwise passes again, not the frozen matmuls, which
    stay outside: a few percent of a layer (r/H of its frozen work).

    Dropout masks are redrawn, not kept: `replay` gives a context in which every job's
    stream restarts from where the forward drew them. Adapter weights reach `run` from its
    closure, not as inputs: their gradients accumulate in .grad from the inner backward, as
    with any leaf. The first input is an empty anchor that requires grad (see recomputed).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        run: Callable[..., Any],
        replay: Callable[[], AbstractContextManager[None]],
        anchor: Tensor,
        *inputs: Tensor,
    ) -> Any:
        ctx.run, ctx.replay = run, replay  # type: ignore[attr-defined]
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return run(*inputs)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, *grads: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad[3:]  # type: ignore[attr-defined]
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(saved, needs, strict=True)]
        with torch.enable_grad(), ctx.replay():  # type: ignore[attr-defined]
            outs = ctx.run(*inputs)  # type: ignore[attr-defined]
        outs = (outs,) if isinstance(outs, Tensor) else outs
        pairs = [
            (o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, *(t.grad if t.requires_grad else None for t in inputs))
