"""Data parallel training: one fused group of jobs over several processes (GPUs or machines)
through torch.distributed, launched by `torchrun` (NCCL on GPUs, gloo on CPUs):

    torchrun --nproc-per-node 2 -m mixloom train CONFIG

Every rank builds the same jobs from the same files and seeds and walks the same data order;
each job's micro-batch is split across the ranks, rank r taking the contiguous share
[m * r / W, m * (r + 1) / W) of its m examples (a DPO job's examples are pairs: a preferred
answer never leaves its other). The result equals the group trained in one process because
every number that is not a sum over rows is made from sums taken over all ranks:

- a job's loss is divided by the WHOLE optimizer step's target tokens (or pairs), which
  every rank knows, so the ranks' gradients add up to the one-process gradient;
- the MixLoRA load-balance loss is nonlinear in the router's batch-wide statistics: those
  are summed over the ranks in the forward (`reduce_router_totals`), and each rank's loss
  carries the global value with the gradient of its own rows' share;
- the gradients of every job that takes an optimizer step, the loss sums and the DPO
  statistics go through ONE all-reduce a fused step (`reduce_step`), before the clipping and
  the non-finite check, which so see the global gradients;
- dropout (and router jitter) draws what one process draws for the whole micro-batch and
  keeps this rank's rows of it (`TokenShare`: model/batch.py maps each row to its index in
  the whole micro-batch), so the masks per row are the one-process masks.

Only rank 0 writes checkpoints, metrics and the exported adapters (trainer/run.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mixloom.data.tokenize import sequence_rows
from mixloom.errors import ConfigError
from mixloom.model.batch import TokenShare

# how long a rank waits for the others at a collective before it gives up (a rank that died)
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Share:
    """This rank's part of one job's micro-batch."""

    examples: slice  # of the micro-batch's examples (rows, or a DPO job's pairs)
    tokens: TokenShare  # where this rank's real tokens lie among the whole micro-batch's


def micro_batch_sizes(rows: int, batch_size: int, micro_rows: int) -> set[int]:
    """Every micro-batch size a job of `rows` examples takes (an epoch's last step and a
    step's last micro-batch may be short)."""
    steps = {batch_size} if rows >= batch_size else set()
    if rows % batch_size:
        steps.add(rows % batch_size)
    sizes = set()
    for s in steps:
        if s >= micro_rows:
            sizes.add(micro_rows)
        if s % micro_rows:
            sizes.add(s % micro_rows)
    return sizes


class DataParallel:
    """This process's place in a data parallel group, and the collectives a fused step
    needs. `from_env` makes one under torchrun (WORLD_SIZE > 1)."""

    def __init__(self, rank: int, world: int, local_rank: int, device: str) -> None:
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device

    @classmethod
    def from_env(cls, device: str) -> DataParallel | None:
        """Join the group torchrun describes in the environment (RANK, WORLD_SIZE,
        LOCAL_RANK, MASTER_ADDR, MASTER_PORT); None when this process runs alone.

        `device` (ModelSettings.device): auto or cuda put each rank on its local GPU,
        cuda:LOCAL_RANK, and the group on NCCL; cpu (or auto without a GPU) on gloo."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{local_rank}"
        elif device == "auto":
            device = "cpu"
        elif device.startswith("cuda:"):
            raise ConfigError(
                f"device {device!r}: under torchrun each rank takes its own GPU "
                f"(cuda:LOCAL_RANK); set device to cuda or auto"
            )
        backend = "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
            backend = "nccl"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        return cls(rank, world, local_rank, device)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    @property
    def writes(self) -> bool:
        """Whether this rank writes checkpoints, metrics and adapters: rank 0 alone."""
        return self.rank == 0

    @contextmanager
    def rank_zero_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it clears what unfinished writes left in the jobs'
        folders), then the others."""
        if self.rank != 0:
            dist.barrier()
        yield
        if self.rank == 0:
            dist.barrier()

    def check(self, name: str, examples: int, batch_size: int, micro_rows: int) -> None:
        """Every micro-batch of the job must give each rank at least one example: a rank with
        none would run no forward for it, and its dropout stream would fall behind."""
        smallest = min(micro_batch_sizes(examples, batch_size, micro_rows))
        if smallest < self.world:
            raise ConfigError(
                f"job {name!r}: a micro-batch of {smallest} example"
                f"{'s' if smallest != 1 else ''} cannot be split across {self.world} "
                f"processes (each needs at least one); give it a batch_size and "
                f"micro_batch_size of at least {self.world} whose last batches are not "
                f"shorter (its {examples} examples), or run fewer processes"
            )

    # -- one fused step ----------------------------------------------------------------

    def share(self, examples: Sequence[Any]) -> Share:
        """This rank's contiguous share of a micro-batch's examples, and where its rows'
        real tokens lie among the whole micro-batch's (sequence_rows order: a DPO job's
        preferred answers, then the others)."""
        m = len(examples)
        lo, hi = m * self.rank // self.world, m * (self.rank + 1) // self.world
        rows = sequence_rows(examples)
        lengths = torch.tensor([len(r.input_ids) for r in rows])
        starts = lengths.cumsum(0) - lengths  # (rows,) first real token of each row
        per_example = len(rows) // m  # 1, or 2 for pairs
        mine = [k * m + i for k in range(per_example) for i in range(lo, hi)]
        index = torch.cat([torch.arange(int(starts[g]), int(starts[g] + lengths[g])) for g in mine])
        return Share(slice(lo, hi), TokenShare(index, int(lengths.sum())))

    def reduce_router_totals(
        self,
        totals: dict[str, tuple[Tensor, Tensor, int]],
        shares: dict[str, Share],
    ) -> dict[str, tuple[Tensor, Tensor, int]]:
        """router_totals over the whole micro-batch, from this rank's (one all-reduce).

        Each job's (E,) summed router probabilities come back as this rank's plus the other
        ranks' as a constant, so a loss made from them has the global value and the gradient
        of this rank's rows; the summed choices are global; the token count (layers x real
        tokens) is scaled from this rank's on the host (every rank holds rows of every job)."""
        names = list(totals)
        if not names:
            return totals
        flat = torch.cat([torch.cat([totals[n][0].detach(), totals[n][1]]) for n in names])
        dist.all_reduce(flat)
        out, at = {}, 0
        for name in names:
            probs, chosen, tokens = totals[name]
            E = probs.shape[0]
            everyone = flat[at : at + E]
            share = shares[name].tokens
            layers = tokens // len(share.index)
            out[name] = (
                probs + (everyone - probs.detach()),
                flat[at + E : at + 2 * E],
                layers * share.total,
            )
            at += 2 * E
        return out

    def reduce_step(self, params: list[torch.nn.Parameter], scalars: list[Tensor]) -> list[Tensor]:
        """Sum over the ranks, in ONE all-reduce of a flat fp32 buffer: the gradients of
        `params` (every parameter of the jobs taking an optimizer step; a missing gradient
        counts as zeros and comes back as one) and `scalars` (0-d or 1-d: loss sums, DPO
        statistics), which come back summed, in order."""
        grads = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
            for p in params
        ]
        flat_scalars = [s.detach().reshape(-1).float() for s in scalars]
        flat = torch.cat(grads + flat_scalars)
        dist.all_reduce(flat)
        at = 0
        for p in params:
            n = p.numel()
            p.grad = flat[at : at + n].view_as(p).to(p.dtype)
            at += n
        out = []
        for s in scalars:
            n = s.numel()
            out.append(flat[at : at + n].view_as(s))
            at += n
        return out
