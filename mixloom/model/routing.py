"""Routing: which experts each MixLoRA job's tokens go to, and the router's statistics.

`choose_experts` runs every MixLoRA job's router over its real tokens and picks experts
(`route`: top-k, top-p or switch), as one batch when the jobs route alike (one batched
matmul, each job's rows against its own router only) or job by job otherwise. `RouterLog`s
sum each job's router probabilities and choices per layer; `router_totals` and `aux_loss`
turn them into the load-balance loss.

Shapes: xf (n, H) every row of the batch; a job's router (E, H) fp32; logits and probs
(n_j, E) over job j's real tokens; per (token, slot) pair: rows, weights, groups (P,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixloom.jobspec import Routing
from mixloom.model.batch import FusedState, Segment, upload
from mixloom.model.packing import joined
from mixloom.model.specs import AdapterSpec


@dataclass(frozen=True)
class Choices:
    """The (token, slot) pairs of one FFN call's MixLoRA jobs, per job in its own (token,
    slot) order: rows (P_j,) int64 token row in the batch, weights (P_j,) fp32 routing
    weight, groups (P_j,) int64 job's base group + expert (-1: no group, top-p's unused
    slots); counts (J,) host pairs per job; num_groups the sum of the jobs' experts."""

    rows: list[Tensor]
    weights: list[Tensor]
    groups: list[Tensor]
    counts: list[int]
    num_groups: int


def choose_experts(
    state: FusedState,
    xf: Tensor,
    segs: list[Segment],
    routers: list[Tensor],
    specs: list[AdapterSpec],
    per_seq: int,
) -> Choices:
    """Route the real tokens of each job of `segs` (its router (E, H), its spec) to experts."""
    if routes_alike(state, specs):
        return choose_together(state, xf, segs, routers, specs, per_seq)
    return choose_per_job(state, xf, segs, routers, specs, per_seq)


def routes_alike(state: FusedState, specs: list[AdapterSpec]) -> bool:
    """Whether the jobs' expert choice can run as one batch: more than one job, the same
    number of experts and routing rule, and no router jitter drawn in this batch."""
    first = specs[0]
    return len(specs) > 1 and all(
        (s.num_experts, s.routing, s.top_k, s.top_p)
        == (first.num_experts, first.routing, first.top_k, first.top_p)
        and not (state.training and s.jitter_noise > 0)
        for s in specs
    )


def choose_together(
    state: FusedState,
    xf: Tensor,
    segs: list[Segment],
    routers: list[Tensor],
    specs: list[AdapterSpec],
    per_seq: int,
) -> Choices:
    """choose_per_job's result for jobs that route alike, in a fixed number of ops
    whatever the number of jobs (on a GPU, each op is a launch): one batched router
    matmul, each job's tokens against its own router only (_RouterLogitsByJob), then one
    softmax and one expert choice."""
    st = state
    spec = specs[0]
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
    return Choices(
        [rows.expand(-1, slots).reshape(-1)],
        [top_w.reshape(-1)],
        [group.reshape(-1)],
        pairs,
        E * len(segs),
    )


def choose_per_job(
    state: FusedState,
    xf: Tensor,
    segs: list[Segment],
    routers: list[Tensor],
    specs: list[AdapterSpec],
    per_seq: int,
) -> Choices:
    """Each job's router over its real tokens: per job, the (token, slot) pairs' rows,
    routing weights and groups (job's base group + expert; -1: no group), and the pair
    count; and the number of groups."""
    st = state
    rows, weights, groups, pairs = [], [], [], []
    gbase = 0
    for seg, router, spec in zip(segs, routers, specs, strict=True):
        lo, hi = seg.start * per_seq, seg.end * per_seq
        tok = st.real_tokens(seg, per_seq, xf.device)  # (n_j,) local rows of real tokens
        if st.training and spec.jitter_noise > 0:  # noise on the real tokens only
            xs = st.jitter(seg.name or "", xf[lo:hi].index_select(0, tok), spec.jitter_noise)
            logits = _RouterLogits.apply(xs, router)  # (n_j, E)
        else:  # every row (E columns are nothing to compute), then the real ones:
            # the backward keeps x itself, not a gathered copy
            logits = _RouterLogits.apply(xf[lo:hi], router)
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
    return Choices(rows, weights, groups, pairs, gbase)


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


# per job: (E,) router probabilities and (E,) choices summed over the real tokens of every
# layer, and the number of those (token, layer) pairs
RouterTotals = dict[str, tuple[Tensor, Tensor, int]]


def router_totals(logs: list[RouterLog]) -> RouterTotals:
    """Per job: (E,) router probabilities and (E,) choices summed over every layer's real
    tokens, and the number of those tokens; layers are summed per group of jobs that logged
    together first (one op, not one per job)."""
    groups: dict[tuple[str, ...], list[RouterLog]] = {}
    for log in logs:
        groups.setdefault(log.names, []).append(log)
    out: RouterTotals = {}
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
