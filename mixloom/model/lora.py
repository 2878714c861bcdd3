"""Plain LoRA of many adapters on one frozen projection: `LoraWeights` (one adapter's A and B,
or E experts' stacked), `lora_rows` (every active job's delta on its own rows, one grouped
kernel call for all of them) and `MultiLoraLinear` (the wrapper that replaces a frozen
nn.Linear and holds one LoraWeights per adapter that targets it).

Shapes: x (n, H) rows of the whole batch (n = B * T), y (n, N) the frozen output; A (r, H),
B (N, r); a stack of G groups (G, R, H) / (G, N, R), zero-padded to the largest rank R.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixloom import kernels
from mixloom.model.batch import FusedState, Segment, upload
from mixloom.model.packing import joined
from mixloom.model.specs import LoraSpec


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


def stack_weights(weights: list[LoraWeights]) -> tuple[Tensor, Tensor]:
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


def lora_rows(
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
        A, B = stack_weights([w for _, w in active])
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
        out = lora_rows(
            self.state,
            x.reshape(-1, x.shape[-1]),
            y.reshape(-1, y.shape[-1]),
            active,  # type: ignore[arg-type]
            self.base.weight,
            per_seq,
        )
        return out.view_as(y)
