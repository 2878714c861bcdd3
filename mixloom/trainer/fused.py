"""The fused multi-job trainer: every step takes one micro-batch from each active job, runs
the frozen base ONCE over all rows, and gives each job the gradient of its own loss.

Invariant (tested): training jobs fused gives the same adapters as training each alone.
It holds because (1) every op of the base is row-wise independent across sequences, (2) each
adapter touches only its own rows, (3) each job's loss is normalised by its own target
count, and (4) dropout/jitter masks come from the job's own RNG stream.

A DPO job's micro-batch of m pairs is 2m rows of its block (the preferred answers, then the
others); its loss is over the rows' summed log-probabilities (trainer/dpo.py), with the
reference's made apart for the job alone the first time a pair comes up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mixloom.data.tokenize import IGNORE_INDEX, EncodedPair, EncodedRow, collate, sequence_rows
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.batch import Segment, upload
from mixloom.model.formats import adapter_state_from_files
from mixloom.trainer import dpo
from mixloom.trainer.distributed import DataParallel, Share
from mixloom.trainer.job import TrainingJob, TrainingState
from mixloom.trainer.loss import linear_cross_entropy


@dataclass
class JobStepMetrics:
    """What one fused step did for one job."""

    name: str
    step: int  # optimizer steps done after this fused step
    micro_done: int  # micro-batches done in the current optimizer step (0 after a step)
    stepped: bool  # an optimizer step happened
    loss: float  # mean token loss of the micro-batch
    step_loss: float | None  # mean token loss of the whole optimizer step, when stepped
    aux_loss: float | None
    lr: float
    tokens: int  # real tokens of the micro-batch
    grad_norm: float | None
    router_load: list[float] | None  # MixLoRA: fraction of routed pairs per expert
    state: TrainingState
    preference: dict[str, float] | None = None  # DPO, when stepped: dpo.step_metrics


@dataclass
class StepReport:
    jobs: list[JobStepMetrics]
    tokens: int
    seconds: float
    shared_with: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _target_rows(
    labels: Tensor, segments: list[Segment]
) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """From host (B, T) labels: the flat rows (b * T + t) of hidden whose next token is a
    target, those targets, and each segment's [start, end) among them (batch order)."""
    B, T = labels.shape
    nxt = labels[:, 1:]  # (B, T-1): the label each position predicts
    keep = nxt != IGNORE_INDEX
    b, t = keep.nonzero(as_tuple=True)
    rows = b * T + t
    per_row = keep.sum(1).tolist()  # targets of each batch row
    bounds, at = [], 0
    for seg in segments:
        n = sum(per_row[seg.start : seg.end])
        bounds.append((at, at + n))
        at += n
    return rows, nxt[b, t], bounds


def _total_norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of all the tensors together, on their device, in a few launches."""
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total_norm is not None:
        return total_norm(tensors, foreach=True)  # type: ignore[no-any-return]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


@dataclass(frozen=True)
class _StepStart:
    """A job's counters and dropout stream where its current optimizer step began."""

    step: int
    tokens_seen: int
    rng: Tensor


class FusedTrainer:
    """Holds the shared AdapterModel and the active jobs; `step()` runs one fused step."""

    def __init__(
        self, model: AdapterModel, pad_id: int, parallel: DataParallel | None = None
    ) -> None:
        """`parallel`: this process's data parallel group (trainer/distributed.py), when each
        job's micro-batches are split across processes."""
        self.model = model
        self.pad_id = pad_id
        self.parallel = parallel
        self.jobs: dict[str, TrainingJob] = {}
        self._step_starts: dict[str, _StepStart] = {}

    # -- membership --------------------------------------------------------------------

    def add_job(self, job: TrainingJob, *, resume: dict[str, Any] | None = None) -> None:
        """Join between steps. `resume`: a checkpoint state from `job_state`."""
        if job.name in self.jobs:
            raise ValueError(f"job {job.name!r} is already training")
        if self.parallel is not None:
            self.parallel.check(job.name, len(job.rows), job.hp.batch_size, job.hp.micro_batch_rows)
        self.model.add_adapter(job.adapter)
        job.build_optimizer(self.model.adapter_parameters(job.name))
        if resume is not None:
            self._restore(job, resume)
        self.jobs[job.name] = job

    def remove_job(self, name: str, *, drop_adapter: bool = True) -> TrainingJob:
        """Leave between steps; frees the job's rows at once (and its weights if asked)."""
        job = self.jobs.pop(name)
        self._step_starts.pop(name, None)
        if drop_adapter:
            self.model.remove_adapter(name)
        return job

    @property
    def active(self) -> list[TrainingJob]:
        return [j for j in self.jobs.values() if j.state == TrainingState.RUNNING and not j.done]

    # -- one fused step ----------------------------------------------------------------

    def step(self, names: Collection[str] | None = None) -> StepReport:
        """One fused step over the active jobs, or over those of them named in `names`
        (a scheduler picks each step's composition; the others simply wait)."""
        t0 = time.perf_counter()
        jobs = [j for j in self.active if names is None or j.name in names]
        if not jobs:
            return StepReport([], 0, 0.0)
        batches = []  # (job, its examples in this process, its optimizer step's count)
        wholes = []  # each job's whole micro-batch (data parallel: all processes' examples)
        shares: dict[str, Share] = {}
        references: dict[str, Tensor] = {}  # DPO jobs: (m, 2) reference log-probabilities
        for job in jobs:
            if job.micro_done == 0:  # where `rollback` sets the job back to
                self._step_starts[job.name] = _StepStart(
                    job.step, job.tokens_seen, self.model.generators[job.name].get_state()
                )
            whole, targets = job.next_micro_batch()
            indices = job.micro_indices()
            rows = whole
            if self.parallel is not None:
                shares[job.name] = share = self.parallel.share(whole)
                rows, indices = whole[share.examples], indices[share.examples]
            if job.preference is not None:
                references[job.name] = self._references(job, indices)
            batches.append((job, rows, targets))
            wholes.append(whole)
        input_ids, labels, mask, segments = self._collate(batches)
        target_rows, targets_flat, bounds = _target_rows(labels, segments)  # host-side layout
        dev = self.model.device
        full = bool(mask.all())  # host-side: no padding, so plain causal attention
        host_mask = None if full else mask
        # uploads from pinned memory: a plain copy from the host waits for the device's queue
        input_ids = upload(input_ids, dev)
        attn = None if full else upload(mask, dev)  # `mask` itself stays the host's: read below
        target_rows, targets_flat = upload(target_rows, dev), upload(targets_flat, dev)

        # The base stays in eval mode (no base dropout); adapters train through FusedState.
        token_shares = {name: share.tokens for name, share in shares.items()}
        with self.model.fused(
            segments, attn, training=True, host_mask=host_mask, shares=token_shares
        ):
            hidden = self.model.backbone(input_ids=input_ids, attention_mask=attn)
            hidden = hidden.last_hidden_state  # (B, T, H)
            totals = self.model.router_totals()
            if self.parallel is not None:  # the load-balance loss is the whole batch's
                totals = self.parallel.reduce_router_totals(totals, shares)
            aux = self.model.aux_losses(totals)
            load_tensors = self.model.router_load(totals)

        # One fused vocabulary projection + cross-entropy over every job's target positions.
        token_losses = self._token_losses(hidden, target_rows, targets_flat)
        sequence_logps = None
        if references:  # each row's summed log-probability of its targets
            rows_of_targets = torch.div(target_rows, labels.shape[1], rounding_mode="floor")
            sequence_logps = -torch.zeros(
                labels.shape[0], device=dev, dtype=token_losses.dtype
            ).index_add(0, rows_of_targets, token_losses)
        sums: list[Tensor] = []  # per job, in batch order: its micro-batch's loss sum
        preference_stats: list[Tensor] = []
        job_loss: list[Tensor] = []
        for (job, rows, targets), seg, (a, b) in zip(batches, segments, bounds, strict=True):
            if job.preference is None:
                token_sum = token_losses[a:b].sum()
            else:
                assert sequence_logps is not None
                m, ref = len(rows), references[job.name]
                policy = sequence_logps[seg.start : seg.end]
                losses, stats = dpo.pair_losses(
                    policy[:m], policy[m:], ref[:, 0], ref[:, 1], job.preference
                )
                token_sum = losses.sum()
                preference_stats.append(stats)
            sums.append(token_sum)
            loss = token_sum / max(1, targets)
            if job.name in aux:
                loss = loss + aux[job.name] / job.micro_batches
            job_loss.append(loss)
        aux_list = [aux[job.name] for job, _, _ in batches if job.name in aux]
        torch.stack(job_loss).sum().backward()

        # Jobs whose micro-batches complete an optimizer step take it now, on the device, with
        # no read in between: the clipping and a non-finite loss or gradient norm reach the
        # fused AdamW step as device scalars (grad_scale, found_inf; the latter skips the
        # update), so the host queues the whole step without waiting for the GPU. What the
        # step did is read once, at the end.
        stepping = [job.micro_done + 1 >= job.micro_batches for job, _, _ in batches]
        if self.parallel is not None:  # everything below sees the whole batch's numbers
            sums, preference_stats, job_loss = self._reduce(
                batches, stepping, sums, preference_stats, aux
            )
        for (job, _, _), steps in zip(batches, stepping, strict=True):
            if steps and not job.optimizer.state:
                self._make_moments(job)
        norms: list[Tensor] = []
        for (job, _, _), loss, steps in zip(batches, job_loss, stepping, strict=True):
            if steps:
                norm = self._clip(job)
                job.optimizer.found_inf = (  # type: ignore[attr-defined]
                    ~(torch.isfinite(norm) & torch.isfinite(loss.detach()))
                ).float()
                self._optimizer_step(job)
                norms.append(norm)

        # the step's one read of the device: losses, sums, aux losses, norms, router loads
        scalars = torch.stack([t.detach() for t in job_loss + sums + aux_list + norms])
        values = torch.cat([scalars, *load_tensors.values(), *preference_stats]).tolist()
        loads, at = {}, scalars.shape[0]
        for name, load in load_tensors.items():
            loads[name] = values[at : at + load.shape[0]]
            at += load.shape[0]
        stats_of = {}
        for job, _, _ in batches:
            if job.preference is not None:
                stats_of[job.name] = values[at : at + len(dpo.STATS)]
                at += len(dpo.STATS)
        n_jobs = len(batches)
        loss_values, sum_values = values[:n_jobs], values[n_jobs : 2 * n_jobs]
        aux_values = iter(values[2 * n_jobs : 2 * n_jobs + len(aux_list)])
        norm_values = iter(values[2 * n_jobs + len(aux_list) : scalars.shape[0]])

        report = []
        total_tokens = 0
        for i, ((job, _, targets), whole) in enumerate(zip(batches, wholes, strict=True)):
            rows_of = sequence_rows(whole)
            tokens = sum(len(r.input_ids) for r in rows_of)  # real tokens of the micro-batch
            # what the micro-batch's mean loss is over: its target tokens, or pairs
            count = (
                len(whole) if job.preference is not None else sum(r.num_targets for r in rows_of)
            )
            aux_value = next(aux_values) if job.name in aux else None
            grad_norm = next(norm_values) if stepping[i] else None
            if not math.isfinite(loss_values[i]):
                self._fail(job, f"loss became {loss_values[i]} at step {job.step + 1}")
                report.append(
                    self._metrics(job, False, float("nan"), None, None, tokens, None, loads)
                )
                continue
            micro_loss = sum_values[i] / max(1, count)
            job.loss_sum += sum_values[i]
            if job.name in stats_of:
                got = stats_of[job.name]
                job.preference_sums = [
                    x + y for x, y in zip(job.preference_sums or [0.0] * len(got), got, strict=True)
                ]
            if aux_value is not None:
                job.aux_sum += aux_value / job.micro_batches
            total_tokens += tokens
            job.tokens_seen += tokens
            aux_value = job.aux_sum if job.adapter.is_mixlora else None  # before advance_step
            job.advance_micro()
            step_loss = None
            preference = None
            if grad_norm is not None:
                if not math.isfinite(grad_norm):  # the update was skipped (found_inf)
                    self._fail(job, f"gradient norm became {grad_norm} at step {job.step + 1}")
                else:
                    job.scheduler.step()
                    step_loss = job.loss_sum / max(1, targets)
                    if job.preference is not None:
                        preference = dpo.step_metrics(job.preference_sums, targets)
                    job.advance_step()
                    if job.done:
                        job.state = TrainingState.SUCCEEDED
            metrics = self._metrics(
                job, stepping[i], micro_loss, step_loss, aux_value, tokens, grad_norm, loads
            )
            metrics.preference = preference
            report.append(metrics)
        seconds = time.perf_counter() - t0
        return StepReport(report, total_tokens, seconds, [j.name for j, _, _ in batches])

    def _reduce(
        self,
        batches: list[tuple[TrainingJob, list[Any], int]],
        stepping: list[bool],
        sums: list[Tensor],
        preference_stats: list[Tensor],
        aux: dict[str, Tensor],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Data parallel: the gradients of the jobs taking an optimizer step, the loss sums
        and the DPO statistics summed over the processes in one all-reduce; returns the
        sums, the statistics and each job's loss (detached) of the whole micro-batch."""
        assert self.parallel is not None
        params = [
            p
            for (job, _, _), steps in zip(batches, stepping, strict=True)
            if steps
            for group in job.optimizer.param_groups
            for p in group["params"]
        ]
        summed = self.parallel.reduce_step(params, sums + preference_stats)
        sums, preference_stats = summed[: len(sums)], summed[len(sums) :]
        job_loss = []
        for (job, _, targets), token_sum in zip(batches, sums, strict=True):
            loss = token_sum / max(1, targets)
            if job.name in aux:
                loss = loss + aux[job.name].detach() / job.micro_batches
            job_loss.append(loss)
        return sums, preference_stats, job_loss

    def rollback(self, names: Collection[str]) -> None:
        """Undo a fused step that raised part way (out of memory): each named job loses the
        step's gradients, and one whose optimizer step did not complete goes back to where
        that step began (micro-batch counter, loss sums, tokens, dropout stream), so that
        running its micro-batches again gives what an uninterrupted run would have."""
        for name in names:
            job = self.jobs[name]
            job.optimizer.zero_grad(set_to_none=True)
            start = self._step_starts.get(name)
            if start is None or job.step != start.step:
                continue
            job.micro_done = 0
            job.loss_sum = 0.0
            job.aux_sum = 0.0
            job.preference_sums = []
            job.tokens_seen = start.tokens_seen
            self.model.generators[name].set_state(start.rng)

    def _collate(
        self, batches: list[tuple[TrainingJob, list[Any], int]]
    ) -> tuple[Tensor, Tensor, Tensor, list[Segment]]:
        """Stack every job's micro-batch as contiguous row blocks, right-padded to one width
        (a DPO job's pairs as 2m rows: _rows_of)."""
        all_rows: list[EncodedRow] = []
        segments = []
        for job, examples, _ in batches:
            rows = sequence_rows(examples)
            segments.append(Segment(job.name, len(all_rows), len(all_rows) + len(rows)))
            all_rows.extend(rows)
        input_ids, labels, mask = collate(all_rows, self.pad_id)
        return input_ids, labels, mask, segments

    def _references(self, job: TrainingJob, indices: list[int]) -> Tensor:
        """(m, 2) on the device: the reference's log-probabilities of the preferred and the
        other answer of the job's pairs `indices`, made now for those not yet made (one
        forward of the base with no adapter over them alone: dpo.py)."""
        missing = [i for i in indices if i not in job.reference]
        if missing:
            chosen, rejected = self._pair_logps([job.rows[i] for i in missing], None)
            for i, c, r in zip(missing, chosen.tolist(), rejected.tolist(), strict=True):
                job.reference[i] = (c, r)
        values = torch.tensor([job.reference[i] for i in indices], dtype=torch.float32)
        return upload(values, self.model.device)

    @torch.no_grad()
    def _pair_logps(self, pairs: list[EncodedPair], adapter: str | None) -> tuple[Tensor, Tensor]:
        """The summed log-probabilities of each pair's answers, (m,) preferred and (m,) other,
        under `adapter` (None: the base alone), in eval mode, in one forward."""
        rows = sequence_rows(pairs)
        dev = self.model.device
        input_ids, labels, mask = collate(rows, self.pad_id)
        segs = [Segment(adapter, 0, len(rows))]
        with self.model.fused(segs, mask.to(dev), training=False, collect_router=False):
            hidden = self.model.backbone(input_ids=input_ids.to(dev), attention_mask=mask.to(dev))
        target_rows, targets, _ = _target_rows(labels, [])
        losses = self._token_losses(hidden.last_hidden_state, target_rows.to(dev), targets.to(dev))
        rows_of_targets = torch.div(target_rows, labels.shape[1], rounding_mode="floor").to(dev)
        logps = -torch.zeros(len(rows), device=dev, dtype=losses.dtype).index_add(
            0, rows_of_targets, losses
        )
        return logps[: len(pairs)], logps[len(pairs) :]

    def _token_losses(self, hidden: Tensor, rows: Tensor, targets: Tensor) -> Tensor:
        """(n,) fp32 next-token losses of the given flat rows of hidden (B*T, H): logits for
        those positions alone (no (B, T, V) tensor for prompt or padding), fused with the
        cross-entropy in row chunks (trainer/loss.py)."""
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (n, H)
        lm_head = self.model.lm_head
        if getattr(lm_head, "bias", None) is not None:
            raise NotImplementedError("a vocabulary projection with a bias is not supported")
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        return linear_cross_entropy(h, lm_head.weight, targets, softcap)

    def _token_loss_sum(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Sum of next-token cross-entropy over the target positions of (b, T) labels."""
        rows, targets, _ = _target_rows(labels.cpu(), [])
        dev = hidden.device
        return self._token_losses(hidden, rows.to(dev), targets.to(dev)).sum()

    def _clip(self, job: TrainingJob) -> Tensor:
        """The norm of the job's gradients, (), on the device, unread; and the job's clipping,
        handed to its optimizer as a divisor of the gradients (`grad_scale`) instead of a pass
        that scales them in place: on a GPU that pass reads and writes every gradient once more
        a step, and with sixteen MixLoRA jobs the gradients are billions of numbers."""
        # the optimizer's own list: walking the model for it costs ~2 ms a job per 8 layers
        params = [p for group in job.optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.model.device)
        norm = _total_norm(grads).to(torch.float32)
        if job.hp.max_grad_norm is not None:
            # what clip_grad_norm_ multiplies by, min(1, max / (norm + 1e-6)), as a divisor
            divisor = ((norm + 1e-6) / job.hp.max_grad_norm).clamp(min=1.0)
            job.optimizer.grad_scale = divisor  # type: ignore[attr-defined]
        return norm

    def _make_moments(self, job: TrainingJob) -> None:
        """AdamW makes a job's moments (twice its weights) at its first step. Made here by a
        step the device skips (found_inf), before any job of this fused step updates its
        weights: running out of memory for them leaves every job as it was, so the worker can
        undo the step and retry it."""
        try:
            job.optimizer.found_inf = torch.ones((), device=self.model.device)  # type: ignore[attr-defined]
            job.optimizer.step()
        finally:
            job.optimizer.__dict__.pop("found_inf", None)

    def _optimizer_step(self, job: TrainingJob) -> None:
        """The job's fused AdamW step on its gradients, divided by `grad_scale` (clipping) as it
        reads them and skipped on the device where `found_inf` is set; then its gradients go."""
        try:
            job.optimizer.step()
        finally:
            for key in ("grad_scale", "found_inf"):
                job.optimizer.__dict__.pop(key, None)
        job.optimizer.zero_grad(set_to_none=True)

    def _fail(self, job: TrainingJob, message: str) -> None:
        job.state = TrainingState.FAILED
        job.error = message
        job.optimizer.zero_grad(set_to_none=True)

    def _metrics(
        self,
        job: TrainingJob,
        stepped: bool,
        loss: float,
        step_loss: float | None,
        aux: float | None,
        tokens: int,
        grad_norm: float | None,
        loads: dict[str, list[float]],
    ) -> JobStepMetrics:
        return JobStepMetrics(
            name=job.name,
            step=job.step,
            micro_done=job.micro_done,
            stepped=stepped,
            loss=loss,
            step_loss=step_loss,
            aux_loss=aux,
            lr=job.lr,
            tokens=tokens,
            grad_norm=grad_norm,
            router_load=loads.get(job.name),
            state=job.state,
        )

    # -- evaluation --------------------------------------------------------------------

    @torch.no_grad()
    def validation_loss(self, name: str, batch_size: int = 8) -> float | None:
        """Mean token loss of the job's validation rows (eval mode: no dropout, no jitter);
        for a DPO job, the mean pair loss of its validation pairs (and their reward accuracy
        in `job.valid_reward_accuracy`)."""
        job = self.jobs[name]
        if not job.validation_rows:
            return None
        if job.preference is not None:
            return self._validation_pairs(job, batch_size)
        total, count = 0.0, 0
        dev = self.model.device
        for i in range(0, len(job.validation_rows), batch_size):
            rows = job.validation_rows[i : i + batch_size]
            input_ids, labels, mask = (t.to(dev) for t in collate(rows, self.pad_id))
            segs = [Segment(name, 0, len(rows))]
            with self.model.fused(segs, mask, training=False, collect_router=False):
                hidden = self.model.backbone(input_ids=input_ids, attention_mask=mask)
            total += float(self._token_loss_sum(hidden.last_hidden_state, labels))
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
        return total / max(1, count)

    def _validation_pairs(self, job: TrainingJob, batch_size: int) -> float:
        total, correct, pairs = 0.0, 0.0, job.validation_rows
        assert job.preference is not None
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            ref_chosen, ref_rejected = self._pair_logps(chunk, None)
            chosen, rejected = self._pair_logps(chunk, job.name)
            losses, stats = dpo.pair_losses(
                chosen, rejected, ref_chosen, ref_rejected, job.preference
            )
            total += float(losses.sum())
            correct += float(stats[dpo.STATS.index("reward_accuracy")])
        job.valid_reward_accuracy = correct / len(pairs)
        return total / len(pairs)

    # -- checkpoint state --------------------------------------------------------------

    def job_state(self, name: str) -> dict[str, Any]:
        """Everything needed to resume the job exactly (taken between optimizer steps)."""
        job = self.jobs[name]
        if job.micro_done:
            raise RuntimeError("checkpoint only between optimizer steps (micro_done == 0)")
        state = {
            "adapter": self.model.adapter_state_dict(name),
            "optimizer": job.optimizer.state_dict(),
            "scheduler": job.scheduler.state_dict(),
            "rng": self.model.generators[name].get_state(),
            "counters": job.counters(),
            "state": job.state.value,
        }
        if job.preference is not None:  # the reference's numbers made so far, exactly
            index = sorted(job.reference)
            state["reference"] = {
                "index": torch.tensor(index, dtype=torch.long),
                "logps": torch.tensor([job.reference[i] for i in index], dtype=torch.float64),
            }
        return state

    def _restore(self, job: TrainingJob, state: dict[str, Any]) -> None:
        adapter = state.get("adapter")
        if adapter is None:  # a checkpoint keeps the weights in its export file only
            adapter = adapter_state_from_files(self.model, job.name, state["adapter_dir"])
        self.model.load_adapter_state_dict(job.name, adapter)
        job.optimizer.load_state_dict(state["optimizer"])
        job.scheduler.load_state_dict(state["scheduler"])
        self.model.generators[job.name].set_state(state["rng"])
        job.restore_counters(state["counters"])
        reference = state.get("reference")
        if job.preference is not None and reference is not None:
            logps = reference["logps"].tolist()
            job.reference = {
                int(i): (c, r) for i, (c, r) in zip(reference["index"].tolist(), logps, strict=True)
            }
