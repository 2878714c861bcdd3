"""The FFN of many adapters: `MultiAdapterMLP` wraps one frozen LLaMA-style FFN (gate, up,
down, act) and holds, per adapter, either plain LoRA on its projections or a MixLoRA mixture
of LoRA experts (`MixLoraWeights`: a router and E stacked expert LoRAs per projection).

A MixLoRA call: route each job's real tokens (model/routing.py), sort the (token, expert)
pairs by group (kernels.group_pairs), then the experts' gate/up LoRA, SiLU(gate) * up and
the routing-weighted sum per token in one kernel (kernels.expert_glu), the frozen down
projection once per token on that sum (the down-projection identity), and the experts'
down LoRA weighted and scattered back (kernels.lora_combine). DoRA experts and non-SiLU
activations take the composed path (_experts_gate_up, _experts_down).

Shapes: x (B, T, H), flattened xf (n, H); frozen gate/up (n, I); P (token, expert) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixloom import kernels
from mixloom.model import routing
from mixloom.model.batch import FusedState, Segment, upload
from mixloom.model.lora import LoraWeights, lora_rows, stack_weights
from mixloom.model.specs import AdapterSpec


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
        return lora_rows(self.state, x, y, active, weight, per_seq)  # type: ignore[arg-type]

    def _route(self, xf: Tensor, segs: list[Segment], per_seq: int) -> _Routed:
        """Route every MixLoRA job's real tokens to experts and sort the (token, expert)
        pairs by group (job's base group + expert)."""
        moes: list[MixLoraWeights] = [self.moe[seg.name or ""] for seg in segs]  # type: ignore[misc]
        specs = [self.specs[seg.name or ""] for seg in segs]
        chosen = routing.choose_experts(
            self.state, xf, segs, [w.router for w in moes], specs, per_seq
        )
        grouped = kernels.group_pairs(  # job-major, then expert
            _joined(chosen.groups),
            chosen.num_groups,
            rows=_joined(chosen.rows),
            weights=_joined(chosen.weights),
            with_tiles=self.state.backend == "triton",
        )
        return _Routed(grouped, chosen.counts, list(zip(segs, moes, specs, strict=True)))

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
            A, B = stack_weights(present)  # type: ignore[arg-type]
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
