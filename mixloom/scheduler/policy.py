"""Scheduling policy, free of torch and of the database: which queued job a worker claims
next, and which admitted jobs go into each fused step.

Fair share works at both levels. Claims: a tenant's n-th waiting job ranks as if it stood
behind n jobs, plus one per job the tenant already has running anywhere, so one tenant's
hundred submissions do not push another tenant's single job to the back. Steps: tenants
take turns (least recently served first), each contributing one job per round, until the
step's token budget or free memory is used up; a job left out goes first next time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Waiting:
    """A queued job as the claim query sees it."""

    id: str
    tenant_id: str
    queued_at: datetime


def fair_claim_order(waiting: Sequence[Waiting], running: dict[str, int]) -> list[Waiting]:
    """Queued jobs in the order a worker should try to claim them.

    `running`: jobs each tenant has running now (on any worker).
    """
    rank: dict[str, int] = {}
    keyed = []
    for job in sorted(waiting, key=lambda j: (j.queued_at, j.id)):
        n = rank.get(job.tenant_id, 0)
        rank[job.tenant_id] = n + 1
        keyed.append(((running.get(job.tenant_id, 0) + n, job.queued_at, job.id), job))
    return [job for _, job in sorted(keyed, key=lambda kv: kv[0])]


@dataclass(frozen=True)
class Candidate:
    """An admitted job that can take part in the next step."""

    name: str
    tenant_id: str
    rows: int  # rows of its next micro-batch
    width: int  # tokens of its longest row
    last_served: int  # index of the last fused step it was in (-1: never)
    order: int  # admission order, the last tie-break


def compose_step(
    candidates: Sequence[Candidate],
    *,
    token_budget: int,
    memory_free: int,
    activation: Callable[[Candidate, int], int],
) -> list[str]:
    """Names of the jobs in the next fused step.

    The step is right-padded to its widest row, so its cost is (sum of rows) x (max width)
    tokens, which must stay within `token_budget`; `activation(candidate, width)` is the
    bytes a candidate's rows need at that width, summed within `memory_free`. The first
    job is always taken (admission guaranteed it fits alone), so no job waits forever.
    """
    by_tenant: dict[str, list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: (c.last_served, c.order)):
        by_tenant.setdefault(c.tenant_id, []).append(c)
    tenants = sorted(by_tenant, key=lambda t: (by_tenant[t][0].last_served, t))
    turns: list[Candidate] = []
    depth = max((len(v) for v in by_tenant.values()), default=0)
    for i in range(depth):
        turns += [by_tenant[t][i] for t in tenants if i < len(by_tenant[t])]

    chosen: list[Candidate] = []
    rows = width = 0
    for c in turns:
        new_rows, new_width = rows + c.rows, max(width, c.width)
        if chosen:
            if new_rows * new_width > token_budget:
                continue
            mem = sum(activation(x, new_width) for x in [*chosen, c])
            if mem > memory_free:
                continue
        chosen.append(c)
        rows, width = new_rows, new_width
    return [c.name for c in chosen]
