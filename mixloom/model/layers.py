"""Multi-adapter layers: each wraps one frozen base module and holds one entry per adapter.

A fused batch is laid out as contiguous row blocks, one per adapter (`Segment`). The frozen
matmuls run once over all rows; each adapter's math touches only its own rows, so a job's
result never depends on what else shares the batch. Row-wise independence is also why a
NaN in one job cannot leak into another: nothing here mixes rows of different segments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixloom import kernels
from mixloom.jobspec import Routing
from mixloom.model.packing import joined
from mixloom.model.specs import AdapterSpec, LoraSpec


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the batch belong to adapter `name` (None: base model only)."""

    name: str | None
    start: int
    end: int


@dataclass
class RouterLog:
    """One layer's routing of the real tokens of the jobs `names` (one job, or all that chose
    their experts together), summed per job: what the load-balance loss and the router loads
    need, and a fixed number of ops a layer whatever the number of jobs (no per-job slice,
    whose gradient would cost a zero-fill and an add per job and layer on a GPU)."""

    names: tuple[str, ...]
    probs: Tensor  # (J, E) fp32: router probabilities summed over each job's real tokens
    chosen: Tensor  # (J, E) fp32: how many of each job's tokens chose each expert
    tokens: list[int]  # (J,) host: each job's real tokens


_T = TypeVar("_T")


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

    def begin(
        self,
        segments: list[Segment],
        attention_mask: Tensor | None,
        *,
        training: bool,
        collect_router: bool,
        host_mask: Tensor | None = None,
    ) -> None:
        """Describe the batch the next forwards run over. `host_mask`: the attention mask as
        the host has it, when the caller does: the layers read padding from it, where
        reading the device's copy would wait for the GPU to finish everything queued."""
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
            drawn = random_bits(self.generators[name], n * cols, device)
            if n != rows:  # padding rows get any bits; their threshold drops them
                assert real is not None
                block = drawn.new_empty(rows, cols).index_copy_(0, real, drawn.view(n, cols))
                drawn = block.view(-1)
            bits.append(drawn)
        flat = bits[0] if len(bits) == 1 else torch.cat(bits)
        return flat.view(-1, cols) >= thresholds[:, None]

    def _thresholds(self, parts: list[tuple[str, int, float, Segment | None]]) -> Tensor:
        """(sum of rows,) int32: a row is kept when its 16 random bits (int16) reach it."""
        never, always = 2 ** (_DROP_BITS - 1), -(2 ** (_DROP_BITS - 1))
        out = []
        for _, rows, p, seg in parts:
            if not self.dropping(p):
                out.append(torch.full((rows,), always, dtype=torch.int32))
                continue
            t = torch.full((rows,), _threshold(p), dtype=torch.int32)
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
        return _mix64(self._seeds[name], n)

    def _counter_rows(
        self, parts: list[tuple[str, int, float, Segment | None]]
    ) -> tuple[Tensor, Tensor]:
        """(sum of rows,) int32 part of each row, and (sum of rows,) int64 index of each row
        among its part's real rows (padding rows: any; their threshold drops them)."""
        jobs, local = [], []
        for j, (_, rows, p, seg) in enumerate(parts):
            jobs.append(torch.full((rows,), j, dtype=torch.int32))
            if seg is not None and self.token_mask is not None and self.dropping(p):
                local.append((self._host_real(seg).cumsum(0) - 1).clamp(min=0))
            else:
                local.append(torch.arange(rows))
        return torch.cat(jobs), torch.cat(local)

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
    _BATCH = ("training", "token_mask", "_host_mask", "_real", "_consts", "_seeds", "_draws")

    def _batch(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._BATCH)

    def _set_batch(self, batch: tuple[Any, ...]) -> None:
        for name, value in zip(self._BATCH, batch, strict=True):
            setattr(self, name, value)

    def jitter(self, name: str, x: Tensor, eps: float) -> Tensor:
        if not self.training or eps == 0.0:
            return x
        gen = on_device(self.generators[name], x.device)
        noise = torch.rand(x.shape, generator=gen, device=x.device)
        return x * (noise * (2 * eps) + (1.0 - eps)).to(x.dtype)


def upload(values: Tensor | list[float] | list[int], device: torch.device) -> Tensor:
    """A small host tensor (or list) on `device` without waiting for the device's queue: a
    plain copy from pageable memory synchronises; from pinned memory it is asynchronous."""
    t = values if isinstance(values, Tensor) else torch.tensor(values)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_DROP_BITS = 16  # random bits per dropout decision


def _drop_count(p: float) -> int:
    return min(round(p * 2**_DROP_BITS), 2**_DROP_BITS - 1)


def dropout_scale(p: float) -> float:
    """The inverted-dropout factor 1 / (1 - p') of keep_mask's resolved probability p'."""
    return 1.0 / (1.0 - _drop_count(p) / 2**_DROP_BITS)


def _threshold(p: float) -> int:
    """Keep a decision when its 16 random bits, read as int16, are at least this."""
    return _drop_count(p) - 2 ** (_DROP_BITS - 1)


def _mix64(seed: int, n: int) -> int:
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
        seeds = upload([_mix64(draw_seed(gen), 0)], device)
        job = torch.zeros(rows, dtype=torch.int32, device=device)
        local = torch.arange(rows, device=device)
        thresholds = torch.full((rows,), _threshold(p), dtype=torch.int32, device=device)
        return kernels.dropout_keep(seeds, job, local, thresholds, cols)
    return random_bits(gen, rows * cols, device).view(rows, cols) >= _threshold(p)


# ----------------------------------------------------------------------------------------
# Adapter weights


class LoraWeights(nn.Module):
    """A (r, in) and B (out, r) for one projection, or stacked (E, r, in), (E, out, r) for
    E experts; plus the DoRA magnitude (out,) / (E, out) when the spec asks for DoRA."""

    def __init__(
        self,
        base: nn.Linear,
        spec: LoraSpec,
        generator: torch.Generator,
        experts: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        out_f, in_f = base.weight.shape
        lead = () if experts is None else (experts,)
        a = torch.empty(*lead, spec.r, in_f)
        if spec.init == "gaussian":
            a.normal_(0.0, 1.0 / spec.r, generator=generator)
        else:  # kaiming-uniform with a=sqrt(5), per expert: bound = 1/sqrt(in)
            bound = 1.0 / math.sqrt(in_f)
            a.uniform_(-bound, bound, generator=generator)
        device = base.weight.device
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(*lead, out_f, spec.r, device=device))
        if spec.dora:
            norm = base.weight.detach().float().norm(dim=1)  # (out,): ||W + s*B@A|| with B = 0
            self.magnitude = nn.Parameter(norm.expand(*lead, out_f).clone())
        else:
            self.magnitude = None

    def dora_scale(self, weight: Tensor) -> Tensor:
        """m / ||W + s*B@A|| row-wise, (out,) or (E, out); the norm is a constant (detached)."""
        assert self.magnitude is not None
        delta = self.lora_B.float() @ self.lora_A.float()  # (..., out, in)
        norm = (weight.float() + self.spec.scale * delta).norm(dim=-1).detach()
        return self.magnitude / norm


class MixLoraWeights(nn.Module):
    """One adapter's MoE on one FFN: router (E, H) in fp32 and stacked expert LoRAs."""

    def __init__(self, mlp: nn.Module, spec: AdapterSpec, generator: torch.Generator) -> None:
        super().__init__()
        hidden = mlp.gate_proj.weight.shape[1]
        device = mlp.gate_proj.weight.device
        router = torch.empty(spec.num_experts, hidden).normal_(
            0.0, spec.router_init_range, generator=generator
        )
        self.router = nn.Parameter(router.to(device))
        self.experts = nn.ModuleDict(
            {
                name: LoraWeights(getattr(mlp, name), spec.expert, generator, spec.num_experts)
                for name in spec.mlp_targets
            }
        )


# ----------------------------------------------------------------------------------------
# Grouped LoRA over row blocks


def _stack(weights: list[LoraWeights]) -> tuple[Tensor, Tensor]:
    """Stack per-group A (r, H) / B (N, r), or per-job experts (E, r, H), into (G, R, H) and
    (G, N, R), zero-padded to the largest rank R (padding gets no gradient)."""
    if len(weights) == 1:
        a, b = weights[0].lora_A, weights[0].lora_B
        return (a[None], b[None]) if a.dim() == 2 else (a, b)
    rmax = max(w.spec.r for w in weights)
    if all(w.spec.r == rmax for w in weights):  # one op each, not one per job (host cost)
        stacked = weights[0].lora_A.dim() == 2
        As: list[Tensor] = [w.lora_A for w in weights]
        Bs: list[Tensor] = [w.lora_B for w in weights]
        A, B = joined(As, stacked=stacked), joined(Bs, stacked=stacked)
        if A is not None and B is not None:  # packed in this order: views, no copy
            return A, B
        join = torch.stack if stacked else torch.cat
        return join(As), join(Bs)
    As, Bs = [], []
    for w in weights:
        a, b = w.lora_A, w.lora_B
        if a.dim() == 2:
            a, b = a[None], b[None]
        pad = rmax - w.spec.r
        As.append(F.pad(a, (0, 0, 0, pad)) if pad else a)
        Bs.append(F.pad(b, (0, pad)) if pad else b)
    return torch.cat(As), torch.cat(Bs)


def _lora_rows(
    state: FusedState,
    x: Tensor,  # (n, H) rows of the whole batch
    y: Tensor,  # (n, N) base output of the same rows
    active: list[tuple[Segment, LoraWeights]],
    base_weight: Tensor,  # (N, H)
    per_seq: int,  # tokens per batch row
) -> Tensor:
    """y + LoRA delta on the rows of every active segment (DoRA-scaled where asked)."""
    segments = state.segments or []
    whole = len(active) == len(segments)  # the active rows are the whole batch, in order
    sizes = [(seg.end - seg.start) * per_seq for seg, _ in active]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    xin = x if whole else torch.cat([x[s.start * per_seq : s.end * per_seq] for s, _ in active])
    drops = [
        (seg.name or "", n, w.spec.dropout, seg) for (seg, w), n in zip(active, sizes, strict=True)
    ]
    dropping = [name for name, _, p, _ in drops if state.dropping(p)]
    scale = [w.spec.scale * state.dropout_factor(w.spec.dropout) for _, w in active]
    key = ("lora", tuple((s.start, s.end) for s, _ in active), tuple(scale), per_seq)
    scales = state.cached(key + ("scale",), lambda: upload(scale, x.device))
    pairs = state.cached(  # the groups are known here: offsets and tile table from the host
        key + ("pairs",),
        lambda: kernels.row_blocks(offsets, x.device, with_tiles=state.backend == "triton"),
    )

    def run(xin: Tensor) -> Tensor:  # (P, N)
        keep = state.dropout_keep(drops, x.shape[1], x.device)  # one mask over the batch
        if keep is not None:
            xin = torch.where(keep, xin, 0.0)  # no float copy of the mask, forward or backward
        A, B = _stack([w for _, w in active])
        lora = kernels.LoraStack(A, B, scales)
        return kernels.lora_segments(xin, lora, pairs, backend=state.backend)

    # with dropout, keep x, not its masked copy and the mask
    delta = state.recomputed(dropping, run, xin) if dropping else run(xin)
    if whole and not any(w.magnitude is not None for _, w in active):
        return y + delta.to(y.dtype)
    by_name = {seg.name: (i, w) for i, (seg, w) in enumerate(active)}
    pieces = []
    for seg in segments:
        ys = y[seg.start * per_seq : seg.end * per_seq]
        if seg.name in by_name:
            i, w = by_name[seg.name]
            ys = ys + delta[offsets[i] : offsets[i + 1]].to(y.dtype)
            if w.magnitude is not None:
                ys = (w.dora_scale(base_weight) * ys.float()).to(y.dtype)
        pieces.append(ys)
    return torch.cat(pieces)


class MultiLoraLinear(nn.Module):
    """A frozen nn.Linear plus one LoRA per adapter that targets it."""

    def __init__(self, base: nn.Linear, state: FusedState) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self._state = [state]  # list: keep it out of the module tree

    @property
    def state(self) -> FusedState:
        return self._state[0]

    @property
    def weight(self) -> Tensor:  # some model code reads proj.weight (dtype/device checks)
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:  # (B, T, H) -> (B, T, N)
        y = self.base(x)
        segments = self.state.segments
        if not segments or not self.adapters:
            return y
        active = [(s, self.adapters[s.name]) for s in segments if s.name in self.adapters]
        if not active:
            return y
        per_seq = x.shape[1]
        out = _lora_rows(
            self.state,
            x.reshape(-1, x.shape[-1]),
            y.reshape(-1, y.shape[-1]),
            active,  # type: ignore[arg-type]
            self.base.weight,
            per_seq,
        )
        return out.view_as(y)


# ----------------------------------------------------------------------------------------
# FFN: plain LoRA on gate/up/down, or a MixLoRA mixture of LoRA experts


@dataclass(frozen=True)
class _Routed:
    """The MixLoRA jobs of one FFN call and their (token, expert) pairs, as the kernels take
    them: sorted by group (job's base group + expert), built on the device without a host
    sync; pairs that belong to no group (top-p's unused slots) sort first."""

    pairs: kernels.GroupedPairs
    counts: list[int]  # host: unsorted pairs of each job (job-local draws, e.g. dropout)
    jobs: list[tuple[Segment, MixLoraWeights, AdapterSpec]]

    def per_job(self, values: list[Tensor]) -> Tensor:
        """Concatenate per-job tensors (one row per unsorted pair) into sorted pair order."""
        return _joined(values).index_select(0, self.pairs.order)


def _joined(values: list[Tensor]) -> Tensor:
    return values[0] if len(values) == 1 else torch.cat(values)


class MultiAdapterMLP(nn.Module):
    """A frozen LLaMA-style FFN (gate/up/down + act) with per-adapter LoRA or MixLoRA."""

    def __init__(self, base: nn.Module, state: FusedState) -> None:
        super().__init__()
        self.base = base
        self.lora = nn.ModuleDict()  # name -> ModuleDict(proj -> LoraWeights)
        self.moe = nn.ModuleDict()  # name -> MixLoraWeights
        self.specs: dict[str, AdapterSpec] = {}
        self._state = [state]

    @property
    def state(self) -> FusedState:
        return self._state[0]

    def act(self, x: Tensor) -> Tensor:
        return self.base.act_fn(x)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, H) -> (B, T, H)
        st = self.state
        segments = st.segments
        if not segments or not any(s.name in self.lora or s.name in self.moe for s in segments):
            return self.base(x)
        bsz, per_seq, hidden = x.shape
        xf = x.reshape(-1, hidden)  # (n, H)
        gate = self.base.gate_proj(xf)  # (n, I)
        up = self.base.up_proj(xf)  # (n, I)

        lora_segs = [s for s in segments if s.name in self.lora]
        moe_segs = [s for s in segments if s.name in self.moe]
        gate = self._plain(xf, gate, lora_segs, "gate_proj", per_seq)
        up = self._plain(xf, up, lora_segs, "up_proj", per_seq)

        routed = self._route(xf, moe_segs, per_seq) if moe_segs else None
        fused = routed is not None and self._fused_ok(routed)
        if routed is not None:
            if fused:
                zsum, delta = self._experts_fused(xf, gate, up, routed)
            else:
                zp, zsum, per_pair_down = self._experts_gate_up(xf, gate, up, routed)

        # z for every row: act(gate)*up for base/LoRA rows, sum_k w_k z_k for MixLoRA rows
        # (down-projection identity: the frozen down matmul then runs once per token).
        if all(seg.name in self.moe for seg in segments):
            z = zsum
        else:
            pieces = []
            for seg in segments:
                lo, hi = seg.start * per_seq, seg.end * per_seq
                if seg.name in self.moe:
                    pieces.append(zsum[lo:hi])
                else:
                    pieces.append(self.act(gate[lo:hi]) * up[lo:hi])
            z = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # (n, I)
        out = self.base.down_proj(z)  # (n, H)
        out = self._plain(z, out, lora_segs, "down_proj", per_seq)
        if routed is not None and fused:
            out = out + delta.to(out.dtype)
        elif routed is not None:
            out = self._experts_down(out, zp, routed, per_pair_down)
        return out.view(bsz, per_seq, hidden)

    def _plain(self, x: Tensor, y: Tensor, segs: list[Segment], proj: str, per_seq: int) -> Tensor:
        active = [(s, self.lora[s.name][proj]) for s in segs if proj in self.lora[s.name]]
        if not active:
            return y
        weight = getattr(self.base, proj).weight
        return _lora_rows(self.state, x, y, active, weight, per_seq)  # type: ignore[arg-type]

    # -- routing -------------------------------------------------------------------------

    def _route(self, xf: Tensor, segs: list[Segment], per_seq: int) -> _Routed:
        """Route every MixLoRA job's real tokens to experts and sort the (token, expert)
        pairs by group (job's base group + expert)."""
        if self._routes_alike(segs):
            rows, weights, groups, pairs, gbase = self._choose_together(xf, segs, per_seq)
        else:
            rows, weights, groups, pairs, gbase = self._choose_per_job(xf, segs, per_seq)
        jobs = [(seg, self.moe[seg.name], self.specs[seg.name or ""]) for seg in segs]
        grouped = kernels.group_pairs(  # job-major, then expert
            _joined(groups),
            gbase,
            rows=_joined(rows),
            weights=_joined(weights),
            with_tiles=self.state.backend == "triton",
        )
        return _Routed(grouped, pairs, jobs)  # type: ignore[arg-type]

    def _routes_alike(self, segs: list[Segment]) -> bool:
        """Whether the jobs' expert choice can run as one batch: more than one job, the same
        number of experts and routing rule, and no router jitter drawn in this batch."""
        specs = [self.specs[seg.name or ""] for seg in segs]
        first = specs[0]
        return len(specs) > 1 and all(
            (s.num_experts, s.routing, s.top_k, s.top_p)
            == (first.num_experts, first.routing, first.top_k, first.top_p)
            and not (self.state.training and s.jitter_noise > 0)
            for s in specs
        )

    def _choose_together(
        self, xf: Tensor, segs: list[Segment], per_seq: int
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[int], int]:
        """_choose_per_job's result for jobs that route alike, in a fixed number of ops
        whatever the number of jobs (on a GPU, each op is a launch): one batched router
        matmul, each job's tokens against its own router only (_RouterLogitsByJob), then one
        softmax and one expert choice."""
        st = self.state
        spec = self.specs[segs[0].name or ""]
        E, dev = spec.num_experts, xf.device
        key = ("route", tuple(segs), per_seq)

        def host_rows() -> tuple[Tensor, Tensor]:
            real = [st.real_tokens_host(seg, per_seq) + seg.start * per_seq for seg in segs]
            job = [torch.full((len(r),), j, dtype=torch.int64) for j, r in enumerate(real)]
            return torch.cat(real), torch.cat(job)

        rows_h, job_h = st.cached(key + ("host",), host_rows)
        counts = st.cached(
            key + ("counts",), lambda: torch.bincount(job_h, minlength=len(segs)).tolist()
        )
        job = st.cached(key + ("job",), lambda: upload(job_h, dev))
        blocks = st.cached(key + ("blocks",), lambda: JobBlocks.build(rows_h, counts, dev))
        routers: list[Tensor] = [self.moe[seg.name or ""].router for seg in segs]  # type: ignore[misc]
        router = joined(routers, stacked=False)  # (J*E, H), a view when packed in this order
        if router is None:
            router = torch.cat(routers)
        logits = _RouterLogitsByJob.apply(xf, router, blocks)  # (n_real, E)
        probs = logits.softmax(-1)
        top_w, top_e, chosen = route(probs, spec)  # (n_real, S) each
        slots = top_e.shape[1]
        if st.router_logs is not None:
            sums = probs.new_zeros(len(segs), E)
            names = tuple(seg.name or "" for seg in segs)
            st.router_logs.append(
                RouterLog(
                    names,
                    sums.index_add(0, job, probs),
                    sums.index_add(0, job, chosen.float()),
                    counts,
                )
            )
        rows = blocks.rows[:, None]
        group = top_e + (job * E)[:, None]
        if spec.routing == Routing.TOP_P:  # unused slots (weight 0) join no group
            group = torch.where(top_w > 0, group, -1)
        pairs = [n * slots for n in counts]
        return (
            [rows.expand(-1, slots).reshape(-1)],
            [top_w.reshape(-1)],
            [group.reshape(-1)],
            pairs,
            E * len(segs),
        )

    def _choose_per_job(
        self, xf: Tensor, segs: list[Segment], per_seq: int
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[int], int]:
        """Each job's router over its real tokens: per job, the (token, slot) pairs' rows,
        routing weights and groups (job's base group + expert; -1: no group), and the pair
        count; and the number of groups."""
        st = self.state
        rows, weights, groups, pairs = [], [], [], []
        gbase = 0
        for seg in segs:
            spec = self.specs[seg.name or ""]
            w: MixLoraWeights = self.moe[seg.name]  # type: ignore[assignment]
            lo, hi = seg.start * per_seq, seg.end * per_seq
            tok = st.real_tokens(seg, per_seq, xf.device)  # (n_j,) local rows of real tokens
            if st.training and spec.jitter_noise > 0:  # noise on the real tokens only
                xs = st.jitter(seg.name or "", xf[lo:hi].index_select(0, tok), spec.jitter_noise)
                logits = _RouterLogits.apply(xs, w.router)  # (n_j, E)
            else:  # every row (E columns are nothing to compute), then the real ones:
                # the backward keeps x itself, not a gathered copy
                logits = _RouterLogits.apply(xf[lo:hi], w.router)
                if st.token_mask is not None:
                    logits = logits.index_select(0, tok)
            probs = logits.softmax(-1)
            top_w, top_e, chosen = route(probs, spec)  # (n_j, S) each
            if st.router_logs is not None:
                log = RouterLog(
                    (seg.name or "",),
                    probs.sum(0, keepdim=True),
                    chosen.float().sum(0, keepdim=True),
                    [probs.shape[0]],
                )
                st.router_logs.append(log)
            n_j, slots = top_e.shape
            rows.append((tok + lo)[:, None].expand(n_j, slots).reshape(-1))
            weights.append(top_w.reshape(-1))
            group = top_e.reshape(-1) + gbase
            if spec.routing == Routing.TOP_P:  # unused slots (weight 0) join no group
                group = torch.where(top_w.reshape(-1) > 0, group, -1)
            groups.append(group)
            pairs.append(n_j * slots)
            gbase += spec.num_experts
        return rows, weights, groups, pairs, gbase

    # -- experts -----------------------------------------------------------------------

    def _expert_input(
        self, x: Tensor, routed: _Routed, pair_space: bool, memo: list[Tensor] | None = None
    ) -> tuple[Tensor, bool]:
        """The LoRA input of every pair, and whether it is per pair: x to gather inside the
        kernel, or a gathered (P, d) tensor when some job applies dropout (its own mask for
        every expert LoRA, drawn in the job's own (token, slot) order, so independent of the
        other jobs).
        `pair_space`: x is already (P, d), one row per sorted pair (the down projection's).
        `memo`: shares one gather of x between calls (gate and up read the same x)."""
        st = self.state
        d = x.shape[1]
        parts = [
            (seg.name or "", n, spec.expert.dropout, None)
            for (seg, _, spec), n in zip(routed.jobs, routed.counts, strict=True)
        ]
        keep = st.dropout_keep(parts, d, x.device)  # (P, d) in each job's (token, slot) order
        if keep is None:
            return x, pair_space
        keep = routed.per_job([keep])
        if pair_space:
            xs = x
        elif memo:
            xs = memo[0]
        else:
            xs = x.index_select(0, routed.pairs.rows)
            if memo is not None:
                memo.append(xs)
        # the dropout factor is in the experts' scale (_stacked)
        return torch.where(keep, xs, 0.0), True

    def _stacked(self, routed: _Routed, proj: str) -> kernels.LoraStack:
        """(G, R, in) A, (G, out, R) B and (G,) scales of every job's experts for `proj`;
        jobs that skip `proj` get zero weights and scale 0, keeping the group layout."""
        weights = [w.experts[proj] if proj in w.experts else None for _, w, _ in routed.jobs]
        scales: list[float] = []
        st = self.state
        for (_, _, spec), lw in zip(routed.jobs, weights, strict=True):
            s = (
                spec.expert.scale * st.dropout_factor(spec.expert.dropout)
                if lw is not None
                else 0.0
            )
            scales += [s] * spec.num_experts
        present = [lw for lw in weights if lw is not None]
        device = self.base.gate_proj.weight.device
        scale = st.cached(("experts", tuple(scales)), lambda: upload(scales, device))
        if len(present) == len(weights):
            A, B = _stack(present)  # type: ignore[arg-type]
            return kernels.LoraStack(A, B, scale)
        out_f, in_f = getattr(self.base, proj).weight.shape
        rmax = max((lw.spec.r for lw in present), default=1)
        parts_a, parts_b = [], []
        for (_, _, spec), lw in zip(routed.jobs, weights, strict=True):
            if lw is None:
                parts_a.append(torch.zeros(spec.num_experts, rmax, in_f, device=device))
                parts_b.append(torch.zeros(spec.num_experts, out_f, rmax, device=device))
            else:
                pad = rmax - lw.spec.r
                parts_a.append(F.pad(lw.lora_A, (0, 0, 0, pad)))
                parts_b.append(F.pad(lw.lora_B, (0, pad)))
        return kernels.LoraStack(torch.cat(parts_a), torch.cat(parts_b), scale)

    def _grouped(self, x: Tensor, per_pair: bool, routed: _Routed, proj: str) -> Tensor:
        """LoRA delta of `proj` for every pair (P, N); jobs that skip `proj` give zeros."""
        lora = self._stacked(routed, proj)
        return kernels.lora_segments(
            x, lora, routed.pairs, per_pair=per_pair, backend=self.state.backend
        )

    def _fused_ok(self, routed: _Routed) -> bool:
        """The fused expert kernels cover SiLU FFNs without DoRA experts (the common case);
        DoRA scales each expert's columns and other activations take the composed path."""
        silu = isinstance(self.base.act_fn, nn.SiLU) or type(self.base.act_fn).__name__ in (
            "SiLUActivation",
            "SiLU",
        )
        return silu and not any(spec.expert.dora for _, _, spec in routed.jobs)

    def _experts_fused(
        self, xf: Tensor, gate: Tensor, up: Tensor, routed: _Routed
    ) -> tuple[Tensor, Tensor]:
        """(weighted z per token (n, I): the frozen down's input; the experts' down LoRA,
        weighted and summed per token (n, H)), from the fused kernels. While training, the
        per-pair activations inside are recomputed in the backward (_Recompute)."""

        def run(xf: Tensor, gate: Tensor, up: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
            r = replace(routed, pairs=replace(routed.pairs, weights=weights))
            zp, zsum = self._expert_glu(xf, gate, up, r)
            return zsum, self._expert_down(zp, r, xf.shape[0])

        st = self.state
        dropping = [
            seg.name or "" for seg, _, spec in routed.jobs if st.dropping(spec.expert.dropout)
        ]
        return st.recomputed(dropping, run, xf, gate, up, routed.pairs.weights)  # type: ignore[no-any-return]

    def _expert_glu(
        self, xf: Tensor, gate: Tensor, up: Tensor, routed: _Routed
    ) -> tuple[Tensor, Tensor]:
        """(z per pair (P, I), weighted z per token (n, I)) from the fused gate/up kernel."""
        memo: list[Tensor] = []
        xg, per_pair = self._expert_input(xf, routed, pair_space=False, memo=memo)
        xu, _ = self._expert_input(xf, routed, pair_space=False, memo=memo)
        return kernels.expert_glu(
            xg,
            xu,
            gate,
            up,
            self._stacked(routed, "gate_proj"),
            self._stacked(routed, "up_proj"),
            routed.pairs,
            per_pair=per_pair,
            backend=self.state.backend,
        )

    def _expert_down(self, zp: Tensor, routed: _Routed, num_rows: int) -> Tensor:
        """sum_k w_k * (down LoRA of z_k) per token (num_rows, H), weighted and scattered in
        one kernel."""
        xd, _ = self._expert_input(zp, routed, pair_space=True)
        lora = self._stacked(routed, "down_proj")
        return kernels.lora_combine(
            xd, lora, routed.pairs, num_rows, per_pair=True, backend=self.state.backend
        )

    def _dora_pair_scale(self, routed: _Routed, proj: str) -> Tensor | None:
        """(P, N) DoRA column scale of each pair's expert for `proj` (ones for jobs without
        DoRA there), or None when no job uses DoRA on `proj`."""
        if not any(proj in w.experts and spec.expert.dora for _, w, spec in routed.jobs):
            return None
        weight = getattr(self.base, proj).weight
        per_group = []
        for _, w, spec in routed.jobs:
            lw = w.experts[proj] if proj in w.experts else None
            if lw is not None and lw.magnitude is not None:
                per_group.append(lw.dora_scale(weight))  # (E, N)
            else:
                per_group.append(
                    torch.ones(spec.num_experts, weight.shape[0], device=weight.device)
                )
        # pairs outside every group carry weight 0: any group's scale will do for them
        return torch.cat(per_group).index_select(0, routed.pairs.groups.clamp(min=0))

    def _experts_gate_up(
        self, xf: Tensor, gate: Tensor, up: Tensor, routed: _Routed
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-pair z_p = act(gate_e) * up_e (P, I); the weighted sum of z over each token's
        experts (n, I); and a mask (P,) of pairs whose frozen down must run per pair (DoRA on
        down scales each expert's columns, so the identity does not hold for them)."""
        xg, per_pair = self._expert_input(xf, routed, pair_space=False)
        g = gate.index_select(0, routed.pairs.rows)
        g = g + self._grouped(xg, per_pair, routed, "gate_proj").to(g.dtype)  # (P, I)
        xu, per_pair = self._expert_input(xf, routed, pair_space=False)
        u = up.index_select(0, routed.pairs.rows)
        u = u + self._grouped(xu, per_pair, routed, "up_proj").to(u.dtype)  # (P, I)
        c = self._dora_pair_scale(routed, "gate_proj")
        if c is not None:
            g = (c * g.float()).to(gate.dtype)
        c = self._dora_pair_scale(routed, "up_proj")
        if c is not None:
            u = (c * u.float()).to(up.dtype)
        zp = self.act(g) * u  # (P, I)
        weighted = zp * routed.pairs.weights[:, None].to(zp.dtype)
        per_pair_down = None
        if self._dora_pair_scale(routed, "down_proj") is not None:
            flags = [
                torch.full((n,), spec.expert.dora and "down_proj" in w.experts, device=zp.device)
                for (_, w, spec), n in zip(routed.jobs, routed.counts, strict=True)
            ]
            per_pair_down = routed.per_job(flags)
            weighted = weighted * (~per_pair_down)[:, None].to(zp.dtype)
        zsum = torch.zeros_like(gate).index_add(0, routed.pairs.rows, weighted)  # (n, I)
        return zp, zsum, per_pair_down

    def _experts_down(
        self, out: Tensor, zp: Tensor, routed: _Routed, per_pair_down: Tensor | None
    ) -> Tensor:
        """Add sum_k w_k * (expert down LoRA of z_k) to every routed token's output."""
        xd, _ = self._expert_input(zp, routed, pair_space=True)
        pair_out = self._grouped(xd, True, routed, "down_proj").to(out.dtype)  # (P, H)
        if per_pair_down is not None:
            frozen = self.base.down_proj(zp) * per_pair_down[:, None].to(zp.dtype)
            c = self._dora_pair_scale(routed, "down_proj")
            assert c is not None
            pair_out = (c * (pair_out + frozen).float()).to(out.dtype)
        pair_out = pair_out * routed.pairs.weights[:, None].to(out.dtype)
        return out.index_add(0, routed.pairs.rows, pair_out)


class _RouterLogits(torch.autograd.Function):
    """x @ router.T in fp32 (routing decisions want full precision), keeping x in its own
    dtype for the backward: autograd would keep the fp32 copy, twice a bf16 x's bytes."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, router: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x, router)
        return x.float() @ router.float().t()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dlogits: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        x, router = ctx.saved_tensors  # type: ignore[attr-defined]
        need_x, need_router = ctx.needs_input_grad  # type: ignore[attr-defined]
        dx = (dlogits @ router.float()).to(x.dtype) if need_x else None
        drouter = (dlogits.t() @ x.float()).to(router.dtype) if need_router else None
        return dx, drouter


@dataclass(frozen=True)
class JobBlocks:
    """Where each job's routed tokens lie, as J blocks of M slots (M: the most tokens any job
    has; a shorter job's last slots are padding), built on the host once a batch."""

    rows: Tensor  # (n_real,) int64: each routed token's row in the batch, job-major
    index: Tensor  # (J, M) int64: the row of each slot (padding slots: any row)
    valid: Tensor | None  # (J, M) bool: real slots; None when no slot is padding
    where: Tensor  # (n_real,) int64: each routed token's slot in the flattened (J * M)

    @staticmethod
    def build(rows: Tensor, counts: list[int], device: torch.device) -> JobBlocks:
        """rows: (n_real,) host int64, job-major; counts: (J,) tokens of each job."""
        slots = max(counts)
        job = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        first = torch.tensor([0, *counts[:-1]]).cumsum(0)  # (J,) first token of each job
        local = torch.arange(rows.shape[0]) - first[job]  # (n_real,) index within its job
        where = job * slots + local
        index = torch.zeros(len(counts) * slots, dtype=torch.int64).index_copy_(0, where, rows)
        valid = None
        if any(c != slots for c in counts):
            flat = torch.zeros(len(counts) * slots, dtype=torch.bool)
            valid = upload(flat.index_fill_(0, where, True).view(len(counts), slots), device)
        return JobBlocks(
            upload(rows, device),
            upload(index.view(len(counts), slots), device),
            valid,
            upload(where, device),
        )

    def gather(self, x: Tensor) -> Tensor:
        """(J, M, H) fp32: each job's rows of x (n, H), zeros in padding slots."""
        J, M = self.index.shape
        xs = x.index_select(0, self.index.view(-1)).float().view(J, M, -1)
        if self.valid is not None:  # a select, not a product: a NaN row times 0 is NaN
            xs = torch.where(self.valid[:, :, None], xs, 0.0)
        return xs


class _RouterLogitsByJob(torch.autograd.Function):
    """Each job's router logits over its own routed tokens, x_j @ router_j.T in fp32, for J
    jobs of E experts in one batched matmul (a fixed number of ops, whatever J).

    Every product reads one job's rows and one job's router, forward and backward: a NaN or
    inf in one job's activations, gradients or router never reaches another job's gradients.
    (One matmul of every row against every router, each row's own columns picked after,
    computes the same logits, but its router gradient sums 0 x the other jobs' rows, and
    0 x NaN = NaN.) x is kept in its own dtype, not as an fp32 copy."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,  # (n, H)
        router: Tensor,  # (J * E, H)
        blocks: JobBlocks,
    ) -> Tensor:
        J = blocks.index.shape[0]
        w = router.float().view(J, -1, router.shape[1])  # (J, E, H)
        logits = torch.bmm(blocks.gather(x), w.transpose(1, 2))  # (J, M, E)
        ctx.save_for_backward(x, router)
        ctx.blocks = blocks  # type: ignore[attr-defined]
        return logits.view(-1, w.shape[1]).index_select(0, blocks.where)  # (n_real, E)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dlogits: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None]:
        x, router = ctx.saved_tensors  # type: ignore[attr-defined]
        blocks: JobBlocks = ctx.blocks  # type: ignore[attr-defined]
        need_x, need_router, _ = ctx.needs_input_grad  # type: ignore[attr-defined]
        J, M = blocks.index.shape
        E = dlogits.shape[1]
        dpad = dlogits.new_zeros(J * M, E).index_copy_(0, blocks.where, dlogits).view(J, M, E)
        dx = drouter = None
        if need_x:
            dxs = torch.bmm(dpad, router.float().view(J, E, -1))  # (J, M, H)
            real = dxs.view(J * M, -1).index_select(0, blocks.where).to(x.dtype)  # (n_real, H)
            dx = x.new_zeros(x.shape).index_copy_(0, blocks.rows, real)
        if need_router:
            drouter = torch.bmm(dpad.transpose(1, 2), blocks.gather(x))  # (J, E, H)
            drouter = drouter.view(J * E, -1).to(router.dtype)
        return dx, drouter, None


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


def route(probs: Tensor, spec: AdapterSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Choose experts from router probabilities.

    Args:
        probs: (n, E) fp32 softmax of the router logits.
    Returns:
        weights (n, S), experts (n, S), chosen (n, E) bool, with S = spec.slots.
        top_k: top k renormalised to sum to 1. switch: top 1 with its raw probability.
        top_p: experts in descending order until the cumulative probability reaches p
        (always at least one), renormalised; unused slots carry weight 0.
    """
    n, num = probs.shape
    if spec.routing == Routing.SWITCH:
        w, e = probs.max(dim=-1, keepdim=True)
    elif spec.routing == Routing.TOP_P:
        sp, e = probs.sort(dim=-1, descending=True)
        before = sp.cumsum(-1) - sp  # mass of the experts ranked above each one
        keep = before < spec.top_p
        w = sp * keep
        w = w / w.sum(-1, keepdim=True)
    else:
        w, e = probs.topk(spec.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
    chosen = torch.zeros(n, num, dtype=torch.bool, device=probs.device)
    chosen.scatter_(1, e, w > 0)
    return w, e, chosen


def router_totals(logs: list[RouterLog]) -> dict[str, tuple[Tensor, Tensor, int]]:
    """Per job: (E,) router probabilities and (E,) choices summed over every layer's real
    tokens, and the number of those tokens; layers are summed per group of jobs that logged
    together first (one op, not one per job)."""
    groups: dict[tuple[str, ...], list[RouterLog]] = {}
    for log in logs:
        groups.setdefault(log.names, []).append(log)
    out: dict[str, tuple[Tensor, Tensor, int]] = {}
    for names, group in groups.items():
        probs = group[0].probs if len(group) == 1 else torch.stack([g.probs for g in group]).sum(0)
        chosen = (
            group[0].chosen if len(group) == 1 else torch.stack([g.chosen for g in group]).sum(0)
        )
        for j, name in enumerate(names):
            n = sum(g.tokens[j] for g in group)
            if name in out:  # logged alone in some layers, together in others
                p, c, m = out[name]
                out[name] = (p + probs[j], c + chosen[j], m + n)
            else:
                out[name] = (probs[j], chosen[j], n)
    return out


def aux_loss(probs: Tensor, chosen: Tensor, tokens: int, spec: AdapterSpec) -> Tensor:
    """Load-balance loss over all layers' real tokens, from router_totals' sums: coef * E *
    sum_e f[e] * P[e], where f[e] is the fraction of tokens routed to e (summed over a
    token's choices) and P[e] the mean router probability of e (the Mixtral form, with k
    choices per token)."""
    if tokens == 0:
        return probs.sum() * 0.0
    frac = chosen / tokens  # (E,)
    mean_p = probs / tokens  # (E,)
    return spec.aux_loss_coef * spec.num_experts * (frac * mean_p).sum()
