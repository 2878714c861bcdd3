"""A training session: one base model and the jobs training on it, each from its spec and
tokenised rows to its final checkpoint. `mixloom train` and the worker both run jobs through
one; the worker adds only what is about leases, the database and the progress bus.

A job's life here: `add` (its adapter and optimizer; resumed from the last checkpoint in its
folder), `step` (fused steps; a checkpoint every `checkpoint_every` optimizer steps; the
final validation; one metrics record per optimizer step), `rollback` after a step ran out
of memory, `finish` (the final checkpoint) and `export`. A job's folder holds
`checkpoints/step-N/` (the adapter in its export format plus `trainer_state.pt`, verified by a
manifest: trainer/checkpoint.py). A checkpoint that fails to write (a full or read-only
disk, a refused quota) is that job's `JobStep.checkpoint_error`; the other jobs of the step
carry on.

Metrics: one record per optimizer step, the same wherever it shows (`mixloom train`'s
metrics.jsonl, GET /v1/fine_tuning/jobs/{id}/metrics, the SSE stream, the dashboard, the
client). Names follow OpenAI's fine-tuning API where it has one:

    train_loss              mean token loss of the optimizer step
    valid_loss              mean token loss of the validation rows (the job's last step; in
                            metrics.jsonl also at step 0, the point to compare it with)
    learning_rate           the step's learning rate
    grad_norm               gradient norm before clipping
    aux_loss                MixLoRA: the router's load-balance loss
    rewards_chosen, rewards_rejected
                            DPO: the mean implicit reward (beta x the log-ratio to the
                            reference) of the preferred and of the other answers
    reward_margin           DPO: their mean difference per pair
    reward_accuracy         DPO: the share of pairs whose preferred answer has the larger one
    logps_chosen, logps_rejected
                            DPO: the answers' mean summed log-probabilities (the policy's)
    valid_reward_accuracy   DPO: reward_accuracy of the validation pairs (with valid_loss,
                            their mean DPO loss)
    router_load             MixLoRA: the share of routed (token, choice) pairs per expert
    epoch, total_steps      where the job is, out of how many optimizer steps
    tokens                  real tokens of the optimizer step (all its micro-batches)
    trained_tokens          real tokens trained so far
    tokens_per_second       the job's tokens over the time of the fused steps it was in
    step_tokens_per_second  all jobs' tokens of the last fused step over its time
    step_seconds            time of the last fused step
    shared_with             how many other jobs were in the last fused step (a count, never
                            which: they may be other tenants')
    eta_seconds, estimated_finish (unix time)
    cpu_memory_bytes, gpu_memory_bytes, gpu_peak_memory_bytes (on a GPU)
    worker_id               the process that trained the step (in the database and
                            metrics.jsonl for operators; never in a tenant's responses)
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixloom import kernels
from mixloom.config import ModelSettings
from mixloom.data.formats import load_jsonl
from mixloom.data.tokenize import (
    EncodedDataset,
    EncodedPairs,
    encode_dataset,
    encode_preferences,
    pad_id_of,
)
from mixloom.jobspec import DpoObjective, LoraHyperparameters
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.base import BaseModel, load_base_model
from mixloom.model.formats import save_adapter
from mixloom.model.specs import AdapterSpec
from mixloom.trainer.checkpoint import Resume, load_latest, remove_partials, save_checkpoint
from mixloom.trainer.distributed import DataParallel
from mixloom.trainer.fused import FusedTrainer, JobStepMetrics, StepReport
from mixloom.trainer.host import tune_cpu_allocator
from mixloom.trainer.job import TrainingJob, TrainingState


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def metric_object(step: int, values: dict[str, Any]) -> dict[str, Any]:
    """One metrics record as GET /v1/fine_tuning/jobs/{id}/metrics returns it; a line of
    `mixloom train`'s metrics.jsonl."""
    return {
        "object": "fine_tuning.job.metric",
        "step": step,
        "created_at": int(time.time()),
        "metrics": values,
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class _Pace:
    """A job's throughput and time to go: wall-clock bookkeeping, no part of its result."""

    last_step_at: float  # monotonic: when its last optimizer step ended, or it joined
    sec_per_step: float | None = None  # moving average over optimizer steps
    step_tokens: int = 0  # tokens of the current optimizer step so far
    step_seconds: float = 0.0  # time of the fused steps those tokens went through
    last_loss: float | None = None  # train_loss of its last optimizer step


@dataclass(frozen=True)
class JobStep:
    """What one fused step did for one job in it."""

    name: str
    job: TrainingJob
    step: int  # optimizer steps done after the fused step
    metrics: dict[str, Any] | None  # the metrics record, when an optimizer step completed
    checkpoint: Path | None  # written at this step (checkpoint_every)
    valid_loss: float | None  # the final validation, when the job has just finished
    checkpoint_error: BaseException | None = None  # the due checkpoint was not written


@dataclass(frozen=True)
class SessionStep:
    jobs: list[JobStep]
    report: StepReport


class TrainingSession:
    """Jobs on one base model: an AdapterModel, a FusedTrainer and each job's folder."""

    def __init__(
        self,
        base: BaseModel,
        settings: ModelSettings,
        *,
        worker_id: str | None = None,
        tune_allocator: bool = False,
        parallel: DataParallel | None = None,
    ) -> None:
        """`tune_allocator`: glibc keeps freed memory on a CPU (trainer/host.py; process-wide,
        so the caller decides). `parallel`: this process's data parallel group
        (trainer/distributed.py): every process runs the same session on its share of each
        micro-batch, and only the one that `writes` writes checkpoints."""
        if tune_allocator and base.device.type == "cpu":
            tune_cpu_allocator()
        self.base = base
        backend = kernels.resolve_backend(settings.kernel_backend, base.device)
        self.model = AdapterModel(base.model, backend=backend, recompute=settings.recompute)
        self.trainer = FusedTrainer(self.model, pad_id_of(base.tokenizer), parallel)
        self.writes = parallel is None or parallel.writes
        self.worker_id = worker_id or default_worker_id()
        self._folders: dict[str, Path] = {}
        self._renderings: dict[str, str] = {}  # how each job's rows became text
        self._pace: dict[str, _Pace] = {}
        self.resumes: dict[str, Resume] = {}  # where each job resumed, and what was refused
        # called as (job name, step) before a due checkpoint is written; what it raises is
        # the JobStep's checkpoint_error (the worker checks the tenant's storage quota)
        self.before_checkpoint: Callable[[str, int], None] | None = None

    @classmethod
    def load(
        cls,
        settings: ModelSettings,
        *,
        base: BaseModel | None = None,
        worker_id: str | None = None,
        tune_allocator: bool = False,
        parallel: DataParallel | None = None,
    ) -> TrainingSession:
        """A session on `settings.base_model`, loaded here unless `base` is given."""
        if base is None:
            base = load_base_model(
                settings.base_model,
                dtype=settings.dtype,
                device=settings.device,
                hub_id=settings.base_model_hub_id,
            )
        return cls(
            base, settings, worker_id=worker_id, tune_allocator=tune_allocator, parallel=parallel
        )

    @property
    def jobs(self) -> dict[str, TrainingJob]:
        return self.trainer.jobs

    @property
    def active(self) -> list[TrainingJob]:
        return self.trainer.active

    # -- joining and leaving -----------------------------------------------------------

    def encode(
        self, path: str | Path, hp: LoraHyperparameters, preference: DpoObjective | None = None
    ) -> EncodedDataset | EncodedPairs:
        """A JSONL file's rows (or a DPO job's pairs, `preference` set), tokenised for the job
        (DataError names every bad line), and the rendering they got (`.rendering`, for
        `add`)."""
        if preference is not None:
            return encode_preferences(
                load_jsonl(path),
                self.base.tokenizer,
                max_seq_len=hp.max_seq_len,
                rendering=hp.rendering,
            )
        return encode_dataset(
            load_jsonl(path),
            self.base.tokenizer,
            max_seq_len=hp.max_seq_len,
            train_on_inputs=hp.train_on_inputs,
            rendering=hp.rendering,
        )

    def add(
        self,
        name: str,
        hp: LoraHyperparameters,
        *,
        seed: int,
        rows: Sequence[Any],
        validation_rows: Sequence[Any] = (),
        folder: Path,
        resume: bool = True,
        resume_at_most: int | None = None,
        rendering: str | None = None,
        preference: DpoObjective | None = None,
    ) -> TrainingJob:
        """Build the job's adapter and optimizer; with `resume`, continue from the newest
        checkpoint under `folder` that verifies (`resumes[name]` says which, and which newer
        ones were corrupt), after removing what unfinished writes left there. A job that had
        reached its end there (a final checkpoint whose result was never handed on) comes
        back SUCCEEDED, to `finish`. `resume_at_most`: the newest checkpoint step recorded
        elsewhere (checkpoint.load_latest). `rendering`: how the rows became text, recorded
        with the adapter (default: that of `rows` when `encode` made them, else "chat").
        `preference`: a DPO job's loss settings (its rows are then `encode`'s pairs)."""
        adapter = AdapterSpec.from_hyperparameters(name, hp, seed=seed)
        if rendering is None:
            rendering = (
                rows.rendering if isinstance(rows, EncodedDataset | EncodedPairs) else "chat"
            )
        job = TrainingJob(
            name,
            adapter,
            hp,
            list(rows),
            seed=seed,
            validation_rows=list(validation_rows),
            preference=preference,
        )
        found = Resume()
        if resume:
            remove_partials(folder / "checkpoints")
            remove_partials(folder)
            found = load_latest(folder / "checkpoints", at_most=resume_at_most)
        try:
            self.trainer.add_job(job, resume=found.state)
        except BaseException:
            if name in self.model.specs and name not in self.trainer.jobs:
                self.model.remove_adapter(name)  # half added: the job may come back later
            raise
        folder.mkdir(parents=True, exist_ok=True)
        self._folders[name] = folder
        self._renderings[name] = rendering
        self.resumes[name] = found
        self._pace[name] = _Pace(time.monotonic())
        if job.done:
            job.state = TrainingState.SUCCEEDED
        return job

    def remove(self, name: str) -> None:
        """Forget the job (its adapter weights and optimizer state are freed)."""
        self.trainer.remove_job(name)
        self._folders.pop(name, None)
        self._renderings.pop(name, None)
        self._pace.pop(name, None)
        self.resumes.pop(name, None)

    # -- stepping ----------------------------------------------------------------------

    def step(self, names: Collection[str] | None = None) -> SessionStep:
        """One fused step over the active jobs (or those named), then for each job whose
        optimizer step completed: its checkpoint when one is due, its final validation when
        it is done, and its metrics record."""
        report = self.trainer.step(names)
        now = time.monotonic()
        out = []
        for m in report.jobs:
            job = self.trainer.jobs[m.name]
            pace = self._pace[m.name]
            pace.step_tokens += m.tokens
            pace.step_seconds += report.seconds
            if job.state == TrainingState.FAILED or m.step_loss is None:  # mid-step, or failed
                out.append(JobStep(m.name, job, job.step, None, None, None))
                continue
            elapsed, pace.last_step_at = now - pace.last_step_at, now
            pace.sec_per_step = (
                elapsed if pace.sec_per_step is None else 0.8 * pace.sec_per_step + 0.2 * elapsed
            )
            pace.last_loss = m.step_loss
            valid = self.trainer.validation_loss(m.name) if job.done and self.writes else None
            metrics = self._metrics(job, m, report, pace, valid)
            pace.step_tokens, pace.step_seconds = 0, 0.0
            every = job.hp.checkpoint_every
            due = bool(every) and job.step % every == 0 and not job.done and self.writes
            ckpt, error = None, None
            if due:
                try:
                    if self.before_checkpoint is not None:
                        self.before_checkpoint(m.name, job.step)
                    ckpt = self.checkpoint(m.name)
                except Exception as exc:  # this job's storage, not the step: the rest go on
                    error = exc
            out.append(JobStep(m.name, job, job.step, metrics, ckpt, valid, error))
        return SessionStep(out, report)

    def rollback(self, names: Collection[str]) -> None:
        """Undo a fused step that raised part way (out of memory): each job goes back to the
        start of its optimizer step (FusedTrainer.rollback) and the memory the step held is
        handed back, so that the step can be retried, smaller."""
        self.trainer.rollback(names)
        for name in names:
            pace = self._pace[name]
            pace.step_tokens, pace.step_seconds = 0, 0.0
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def _metrics(
        self,
        job: TrainingJob,
        m: JobStepMetrics,
        report: StepReport,
        pace: _Pace,
        valid: float | None,
    ) -> dict[str, Any]:
        eta = (job.total_steps - job.step) * (pace.sec_per_step or 0.0)
        values: dict[str, Any] = {
            "train_loss": m.step_loss,
            "learning_rate": m.lr,
            "grad_norm": m.grad_norm,
            "epoch": job.epoch,
            "total_steps": job.total_steps,
            "tokens": pace.step_tokens,
            "trained_tokens": job.tokens_seen,
            "tokens_per_second": round(pace.step_tokens / pace.step_seconds, 1)
            if pace.step_seconds
            else 0.0,
            "step_tokens_per_second": round(report.tokens_per_second, 1),
            "step_seconds": round(report.seconds, 4),
            "shared_with": sum(1 for n in report.shared_with if n != m.name),
            "eta_seconds": round(eta, 1),
            "estimated_finish": int(time.time() + eta),
            "cpu_memory_bytes": _rss_bytes(),
            "worker_id": self.worker_id,
        }
        if m.aux_loss is not None:
            values["aux_loss"] = m.aux_loss
        if m.preference is not None:
            values.update(m.preference)
        if valid is not None and job.valid_reward_accuracy is not None:
            values["valid_reward_accuracy"] = round(job.valid_reward_accuracy, 6)
        if m.router_load is not None:
            values["router_load"] = [round(x, 4) for x in m.router_load]
        if self.model.device.type == "cuda":
            values["gpu_memory_bytes"] = int(torch.cuda.memory_allocated(self.model.device))
            values["gpu_peak_memory_bytes"] = int(
                torch.cuda.max_memory_allocated(self.model.device)
            )
        if valid is not None:
            values["valid_loss"] = valid
        return values

    # -- validation, checkpoints, results ----------------------------------------------

    def validation_loss(self, name: str) -> float | None:
        return self.trainer.validation_loss(name)

    def baseline(self, name: str) -> dict[str, Any] | None:
        """The step-0 metrics of a job that has not trained yet: its validation loss, the
        point its final one compares with (None without validation rows)."""
        job = self.trainer.jobs[name]
        if job.step or not job.validation_rows:
            return None
        return {"valid_loss": self.trainer.validation_loss(name)}

    def checkpoint(self, name: str) -> Path:
        """Write the job's checkpoint for its current step (between optimizer steps)."""
        job = self.trainer.jobs[name]
        folder = self._folders[name] / "checkpoints" / f"step-{job.step}"
        return save_checkpoint(self.trainer, name, folder, **self._adapter_names(name))

    def rendering(self, name: str) -> str:
        """How the job's rows became text: "chat" or "plain" (its hyperparameters')."""
        return self._renderings.get(name, "chat")

    def _adapter_names(self, name: str) -> dict[str, str]:
        """What an adapter file records of its base and rendering (formats.save_adapter)."""
        return {
            "base_name": self.base.hub_id,
            "base_path": self.base.name_or_path,
            "rendering": self.rendering(name),
        }

    def checkpoint_estimate(self, name: str) -> int:
        """Bytes a checkpoint of the job will take before writing it: the adapter (fp32)
        three times over (its export file and AdamW's two moments)."""
        params = self.model.adapter_parameters(name)
        return 3 * sum(p.numel() * 4 for p in params) + 64 * 1024

    def checkpoint_metrics(self, name: str) -> dict[str, Any]:
        """What a checkpoint record carries: the last train_loss and a fresh valid_loss."""
        metrics: dict[str, Any] = {"train_loss": self._pace[name].last_loss}
        valid = self.trainer.validation_loss(name)
        if valid is not None:
            metrics["valid_loss"] = valid
        return metrics

    def finish(self, name: str) -> Path:
        """The final checkpoint of a job that succeeded (its adapter in the export format)."""
        return self.checkpoint(name)

    def export(self, name: str, folder: Path) -> Path:
        """The job's adapter files (PEFT / MixLoRA format) written into `folder`."""
        return save_adapter(self.model, name, folder, **self._adapter_names(name))
