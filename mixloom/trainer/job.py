"""One training job's own state inside a fused trainer: data order and cursor, optimizer,
LR schedule, gradient accumulation, counters. Nothing here knows about other jobs.

A job's examples are rows (supervised) or preference pairs (DPO, `preference` set): its
batch_size, order and epochs count examples either way."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from mixloom.data.tokenize import EncodedPair, EncodedRow
from mixloom.errors import DataError
from mixloom.jobspec import DpoObjective, LoraHyperparameters
from mixloom.model.specs import AdapterSpec


class TrainingState(StrEnum):
    """Where a job's training stands inside a trainer. Not the stored job status
    (storage.records.JobStatus: queued, paused, cancelled, ...), which a worker sets from it."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def lr_lambda(kind: str, warmup: int, total: int):  # type: ignore[no-untyped-def]
    """Multiplier of the peak LR at optimizer step `s` (0-based): linear warmup, then
    linear decay to 0, cosine decay to 0, or constant."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


@dataclass
class TrainingJob:
    """A job as the trainer runs it. `rows` are its tokenised training examples: rows, or
    pairs for a DPO job (`preference`, its loss settings)."""

    name: str
    adapter: AdapterSpec
    hp: LoraHyperparameters
    rows: list[Any]  # list[EncodedRow], or list[EncodedPair] with `preference`
    seed: int = 42
    validation_rows: list[Any] = field(default_factory=list)
    preference: DpoObjective | None = None

    # runtime state (restored from checkpoints)
    epoch: int = 0
    cursor: int = 0  # rows of the current epoch already consumed by finished optimizer steps
    step: int = 0  # optimizer steps done
    micro_done: int = 0  # micro-batches done within the current optimizer step
    state: TrainingState = TrainingState.RUNNING
    error: str | None = None
    optimizer: Any = None
    scheduler: Any = None
    loss_sum: float = 0.0  # summed token loss of the current optimizer step
    aux_sum: float = 0.0
    tokens_seen: int = 0
    # DPO: the reference model's (the base's) summed log-probabilities of each pair's
    # answers, by index in `rows`, made the first time a pair is trained on (FusedTrainer)
    reference: dict[int, tuple[float, float]] = field(default_factory=dict)
    # DPO: the optimizer step's sums so far (dpo.STATS order) and its last validation
    preference_sums: list[float] = field(default_factory=list)
    valid_reward_accuracy: float | None = None
    _perm: list[int] | None = None
    _perm_epoch: int = -1

    def __post_init__(self) -> None:
        if not self.rows:
            raise DataError(
                f"job {self.name!r} has no training rows (every row was empty or dropped)"
            )
        kind = EncodedPair if self.preference is not None else EncodedRow
        for what, examples in (("training", self.rows), ("validation", self.validation_rows)):
            if examples and not isinstance(examples[0], kind):
                raise DataError(
                    f"job {self.name!r}: its {what} examples are "
                    f"{type(examples[0]).__name__}s, but its objective trains on "
                    f"{kind.__name__}s"
                )

    # -- schedule ----------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.rows) / self.hp.batch_size)

    @property
    def total_steps(self) -> int:
        total = self.hp.n_epochs * self.steps_per_epoch
        return min(total, self.hp.max_steps) if self.hp.max_steps else total

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.hp.warmup_ratio * self.total_steps)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def build_optimizer(self, params: list[torch.nn.Parameter]) -> None:
        self.optimizer = torch.optim.AdamW(
            params, lr=self.hp.learning_rate, weight_decay=self.hp.weight_decay, fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.hp.lr_scheduler, self.warmup_steps, self.total_steps)
        )

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- data order --------------------------------------------------------------------

    def _permutation(self) -> list[int]:
        """This epoch's row order: a shuffle seeded by (seed, epoch), the same on resume."""
        if self._perm_epoch != self.epoch or self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(len(self.rows), generator=g).tolist()
            self._perm_epoch = self.epoch
        return self._perm

    def step_indices(self) -> list[int]:
        """Indices in `rows` of the current optimizer step's examples (batch_size, or fewer
        at an epoch's end)."""
        return self._permutation()[self.cursor : self.cursor + self.hp.batch_size]

    def step_rows(self) -> list[Any]:
        """Examples of the current optimizer step."""
        return [self.rows[i] for i in self.step_indices()]

    @property
    def micro_batches(self) -> int:
        return math.ceil(len(self.step_indices()) / self.hp.micro_batch_rows)

    def micro_indices(self) -> list[int]:
        """Indices in `rows` of the next micro-batch's examples."""
        size = self.hp.micro_batch_rows
        lo = self.micro_done * size
        return self.step_indices()[lo : lo + size]

    def next_micro_batch(self) -> tuple[list[Any], int]:
        """(examples of the next micro-batch, what the whole optimizer step's loss is
        divided by: its target tokens, or for DPO its pairs).

        The loss of every micro-batch is divided by the whole step's count, so accumulation
        gives exactly the gradient of the full batch's mean token (or pair) loss."""
        rows = self.step_rows()
        count = len(rows) if self.preference else sum(r.num_targets for r in rows)
        return [self.rows[i] for i in self.micro_indices()], count

    def advance_micro(self) -> bool:
        """Count one finished micro-batch; True when the optimizer step is complete."""
        self.micro_done += 1
        return self.micro_done >= self.micro_batches

    def advance_step(self) -> None:
        self.cursor += len(self.step_rows())
        self.step += 1
        self.micro_done = 0
        self.loss_sum = 0.0
        self.aux_sum = 0.0
        self.preference_sums = []
        if self.cursor >= len(self.rows):
            self.epoch += 1
            self.cursor = 0

    # -- checkpoint state --------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """Taken between optimizer steps only (no micro-batch of a step is done then)."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
        }

    def restore_counters(self, data: dict[str, Any]) -> None:
        self.epoch = int(data["epoch"])
        self.cursor = int(data["cursor"])
        self.step = int(data["step"])
        self.micro_done = 0
        self.tokens_seen = int(data.get("tokens_seen", 0))
