"""The worker: one base model (of the deployment's MIXLOOM_BASE_MODELS, --base-model), many
jobs trained together in fused steps; it claims only that base's jobs and requests.

Loop (one thread; a heartbeat thread renews leases beside it):

    expire dead workers' leases -> carry out cancel/pause requests -> claim queued jobs that
    fit (fair share, memory admission) -> compose the step (fair share, token budget) ->
    one fused step -> metrics, checkpoints, finished jobs -> again

Two workers never train one job at once: a worker steps a job only while its lease is
surely valid (renewed less than `lease - margin` seconds ago by its own clock), and writes
metrics, a checkpoint or a result only in a transaction that re-checks the lease. A lease is
sized from the measured step time (LEASE_STEPS of the slowest recent steps, at least
worker_lease_seconds), so a step outlives no lease on however slow a machine. A killed
worker's jobs are re-queued by whichever process next runs `expire_leases` and resume from
their last checkpoint, which holds everything a run needs (adapter, optimizer, schedule,
RNG, data cursor), so the result equals an uninterrupted run; the metrics the dead worker
wrote past that checkpoint are deleted then, so the history has one row per step.

What a job's training does (build, step, checkpoint cadence, resume, rollback, validation,
metrics, final checkpoint) is the TrainingSession's (trainer/session.py), the same that
`mixloom train` runs; this module adds the leases, the database and the bus.

Faults stay with the job that caused them. An error in work on one job (its data, its
resume, its checkpoint, its archive, its result) stops that job alone: paused when storage
is full, read-only or failing, or its tenant's quota refuses the write (it resumes from its
last checkpoint once space is freed), failed otherwise, each with an event that says why. A
fused step that raises is rolled back and each of its jobs retried alone once; the one whose
step raises alone fails. A job whose lease expires `worker_max_crashes` times without
reaching a new checkpoint is failed as poisoned (storage.jobs.expire_leases). Only the
database being unreachable pauses the whole loop (it retries); the loop itself never ends
on an error.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.exc import DBAPIError

from mixloom.config import Settings
from mixloom.data.tokenize import sequence_rows
from mixloom.errors import DataError, QuotaExceededError
from mixloom.jobspec import Method
from mixloom.model_ids import fine_tuned_model_id, served_base_id
from mixloom.observability import worker_metrics
from mixloom.scheduler import memory
from mixloom.scheduler.evaluation import evaluate_job, evaluation_summary
from mixloom.scheduler.inference import InferenceHost
from mixloom.scheduler.policy import Candidate, compose_step
from mixloom.scheduler.queue import claim_next, hyperparameters
from mixloom.storage import archives, files, jobs, objects, tenants, workers
from mixloom.storage.bus import ProgressBus
from mixloom.storage.db import Database
from mixloom.storage.jobs import LeaseLostError
from mixloom.storage.objects import StoreUnavailableError
from mixloom.storage.outage import Outage
from mixloom.storage.records import CheckpointRecord, JobRecord, JobStatus, RequestedAction
from mixloom.trainer.checkpoint import (
    fetch_checkpoints,
    storage_problem,
    stored_bytes,
    upload_checkpoint,
)
from mixloom.trainer.job import TrainingJob, TrainingState
from mixloom.trainer.session import (
    JobStep,
    SessionStep,
    TrainingSession,
    default_worker_id,
    is_out_of_memory,
)

log = logging.getLogger("mixloom.worker")

OOM_RETRIES_ALONE = 3  # a job that runs out of memory this often on its own fails
# A lease lasts at least this many of the slowest recent steps: a step that starts with the
# margin left (at most half a lease) ends before the lease does even if no heartbeat gets
# through meanwhile, however slow the machine (worker_lease_seconds is the shortest lease).
LEASE_STEPS = 3
RECENT_STEPS = 8  # the steps a lease is sized from
MIN_TOKEN_BUDGET = 256  # out-of-memory back-off halves the step budget down to this
MAX_LOOP_BACKOFF = 60.0  # seconds between tries after unexpected errors in the loop
INFERENCE_MIN_SLICE_S = 0.05  # decoding time a turn at least, when no training step ran


def jobs_dir(settings: Settings) -> Path:
    """This worker's own copies of checkpoints and adapters (written here, then put into
    the object store under the same key below data_dir: `checkpoint_key`)."""
    return settings.data_dir / "jobs"


def checkpoint_key(job_id: str, step: int | None = None) -> str:
    """The object store's key of a job's checkpoints (step None), or of one of them."""
    root = f"jobs/{job_id}/checkpoints"
    return root if step is None else f"{root}/step-{step}"


@dataclass
class Held:
    """A job this worker holds a lease on and trains."""

    record: JobRecord
    job: TrainingJob | None  # None until its data is loaded
    order: int
    state_bytes: int
    lease_ok_until: float  # monotonic; the lease is surely valid before this
    requested: RequestedAction | None = None
    lost: bool = False
    last_served: int = -1
    last_metrics_at: float = -math.inf
    last_ckpt_step: int = -1  # of the last checkpoint recorded in the database
    oom_alone: int = 0
    # metrics rows not yet stored (the database was away): written with the next ones
    unstored_metrics: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    # the object store unreachable: the newest checkpoint written here but not uploaded
    # (step, folder), kept until it is; the final one's folder; when to try again
    unuploaded: tuple[int, Path, dict[str, Any]] | None = None  # (step, folder, metrics)
    final: Path | None = None
    unrecorded: list[int] = field(default_factory=list)  # steps whose objects to delete
    upload_retry_at: float = -math.inf
    upload_wait: float = 0.0


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 8 * memory.GIB


class Worker:
    """Trains every job it can hold on one base model. `run(stop)` until `stop` is set."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database,
        bus: ProgressBus,
        base: Any = None,
    ) -> None:
        # one base of the deployment's (worker_base_model): its jobs and requests alone
        settings = settings.holding(settings.held_base())
        self.settings = settings
        self.id = settings.worker_id or default_worker_id()
        self.db = db
        self.bus = bus
        self.model_id = settings.base_model
        self.base = base  # model.base.BaseModel; loaded in run() when not given
        self.training: TrainingSession  # made in run(), with the base model
        self.inference: InferenceHost | None = (
            None  # made in run(), unless worker_role is "training"
        )
        self.held: dict[str, Held] = {}
        self.token_budget = settings.worker_step_token_budget
        self.steps = 0
        self.ready = threading.Event()  # the base model is loaded and the loop runs
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._notified: set[str] = set()
        self._orders = 0
        self._last_step_seconds = 0.0  # the fused step alone (inference gets as long)
        self._last_step_wall = 0.0  # and what the session did after it (leases)
        self._recent_steps: deque[float] = deque(maxlen=RECENT_STEPS)
        self._lease_seconds = settings.worker_lease_seconds
        self._last_claim = -math.inf
        self._last_expire = -math.inf
        self._base_scores: dict[tuple[Any, ...], dict[str, Any]] = {}  # (task, settings) -> base's
        self.database_outage = Outage(
            "database",
            meanwhile="jobs keep their state here and training waits for it",
            logger=log,
        )
        # bytes: uploads, checkpoints, adapters (data_dir holds this worker's copies)
        self.store = objects.open_store(settings)
        self._store_back_at = -math.inf  # no claims before: a job's data could not be fetched

    # -- lifecycle ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._load()
        self._register()
        done = threading.Event()
        threads = [
            threading.Thread(target=self._heartbeats, args=(done,), daemon=True),
            threading.Thread(target=self._wakeups, args=(done,), daemon=True),
        ]
        for t in threads:
            t.start()
        log.info(
            "worker %s ready: %s, memory budget %.2f GiB, step budget %d tokens",
            self.id,
            self.model_id,
            self.budget / memory.GIB,
            self.token_budget,
        )
        self._describe_metrics()
        self.ready.set()
        failures = 0
        try:
            while not stop.is_set():
                try:
                    stepped = self.tick()
                    failures = 0
                except DBAPIError as exc:  # the database restarts or fails over: keep the jobs
                    self.database_outage.failed(exc.orig if exc.orig is not None else exc)
                    stop.wait(self.settings.worker_poll_seconds)
                    continue
                except Exception:  # a bug: jobs' own errors never get here; keep serving
                    failures += 1
                    wait = min(
                        MAX_LOOP_BACKOFF, self.settings.worker_poll_seconds * 2 ** min(failures, 8)
                    )
                    log.exception(
                        "unexpected error in the worker loop (%d in a row); retrying in %.1f s",
                        failures,
                        wait,
                    )
                    stop.wait(wait)
                    continue
                if not stepped:
                    self._wake.wait(self._idle_wait())
        finally:
            self._shutdown()
            done.set()
            self._unregister()

    def _describe_metrics(self) -> None:
        """This worker in its /metrics (observability.py): its base, role and device, and
        the jobs it holds, read at each scrape."""
        metrics = worker_metrics()
        metrics.info.labels(
            worker_id=self.id,
            base=served_base_id(self.settings),
            role=self.settings.worker_role,
            device=str(self.training.base.device),
        ).set(1)
        metrics.jobs_held.set_function(lambda: len(self.held))

    def _idle_wait(self) -> float:
        """How long an idle loop sleeps: new jobs are looked for every worker_poll_seconds
        (a bus wake-up comes sooner), inference requests every inference_poll_seconds."""
        wait = min(self.settings.worker_poll_seconds, 0.5)
        if self.inference is not None:
            wait = min(wait, self.settings.inference_poll_seconds)
        return wait

    def _load(self) -> None:
        self.training = TrainingSession.load(
            self.settings,
            base=self.base,
            worker_id=self.id,
            # process-wide, and this process may serve the API too: only when asked
            tune_allocator=self.settings.cpu_malloc_tuning is True,
        )
        self.training.before_checkpoint = self._before_checkpoint
        base = self.base = self.training.base
        if self.settings.worker_role != "training":
            self.inference = InferenceHost(
                self.settings,
                db=self.db,
                bus=self.bus,
                worker_id=self.id,
                base_id=self.model_id,
                model=self.training.model,
                tokenizer=base.tokenizer,
            )
        params = list(base.model.parameters())
        base_bytes = sum(p.numel() * p.element_size() for p in params)
        self.shape = memory.ModelShape.from_config(
            base.model.config,
            dtype_bytes=params[0].element_size(),
            base_bytes=base_bytes,
            recompute=self.training.model.state.recompute,
        )
        if self.settings.worker_memory_budget_gb is not None:  # training's, as the operator says
            self.budget = int(self.settings.worker_memory_budget_gb * memory.GIB)
            return
        if base.device.type == "cuda":
            total = torch.cuda.get_device_properties(base.device).total_memory
            self.budget = int(0.9 * total)
        else:
            self.budget = base_bytes + int(0.8 * _available_ram())
        if self.inference is not None:  # what decoding may hold, kept from training's share
            self.budget -= self.inference.reserved_bytes()

    # -- one turn of the loop ----------------------------------------------------------

    def tick(self) -> bool:
        """One turn of the loop; False when there was nothing to step."""
        now = time.monotonic()
        if now - self._last_expire >= min(self.settings.worker_lease_seconds / 2, 5.0):
            self._last_expire = now
            self._expire()
        self._carry_out_requests()
        # inference first, for as long as a training step takes: a request waits at most one
        # training step for its first token, and training keeps half the time under load
        decoded = self.inference is not None and self.inference.serve(
            max(self._last_step_seconds, INFERENCE_MIN_SLICE_S)
        )
        if self.settings.worker_role == "inference":
            return decoded
        due = self._wake.is_set() or now - self._last_claim >= self.settings.worker_poll_seconds
        if due and now >= self._store_back_at:
            self._wake.clear()
            self._last_claim = now
            self._claim()
        names = self._compose()
        if names:
            self._step(names)
        return bool(names) or decoded

    def _expire(self) -> None:
        with self.db.transaction() as session:
            expired = jobs.expire_leases(
                session=session, max_crashes=self.settings.worker_max_crashes
            )
        for record in expired:
            outcome = "requeued" if record.status == JobStatus.QUEUED else "failed"
            worker_metrics().lease_expiries.labels(outcome=outcome).inc()
            log.warning(
                "lease of %s expired (crash %d): now %s",
                record.id,
                record.crashes,
                record.status.value,
            )
            h = self.held.get(record.id)
            if h is not None:  # ours, not renewed in time (a database outage): drop our copy
                h.lost = True
                self._drop(h)
            self._publish(record.id, record.last_seq - 1)
        if any(r.status == JobStatus.QUEUED for r in expired):
            self._wake.set()
        if self.inference is not None:
            self.inference.maintain()

    # -- leases ------------------------------------------------------------------------

    @property
    def lease_seconds(self) -> float:
        """The lease this worker takes and renews: worker_lease_seconds, or LEASE_STEPS of
        its slowest recent steps when that is longer (a slow machine needs no flag)."""
        return self._lease_seconds

    def _size_lease(self, step_seconds: float) -> None:
        self._recent_steps.append(step_seconds)
        lease = max(self.settings.worker_lease_seconds, LEASE_STEPS * max(self._recent_steps))
        if lease > 1.25 * self._lease_seconds or lease < 0.8 * self._lease_seconds:
            log.info(
                "steps take up to %.1f s: leases are now %.0f s (%d steps), renewed every %.1f s",
                max(self._recent_steps),
                lease,
                LEASE_STEPS,
                self.settings.worker_heartbeat,
            )
            self._lease_seconds = lease

    def _heartbeats(self, done: threading.Event) -> None:
        while not done.wait(self.settings.worker_heartbeat):
            self._registry_heartbeat()
            with self._lock:
                ids = [i for i, h in self.held.items() if not h.lost]
            if ids:
                self._renew_all(ids)
            if self.inference is not None:
                try:
                    self.inference.heartbeat()
                except DBAPIError as exc:
                    self.database_outage.failed(exc.orig if exc.orig is not None else exc)
                except Exception:
                    log.exception("renewing the inference requests' leases failed")

    # -- the workers registry (storage/workers.py) --------------------------------------

    def _register(self) -> None:
        """This worker's row in the registry: the base it holds, its role and devices (the
        database away: the next heartbeat registers it)."""
        try:
            with self.db.transaction() as session:
                workers.register(
                    session=session,
                    worker_id=self.id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    base=served_base_id(self.settings),
                    source=self.model_id,
                    role=self.settings.worker_role,
                    devices=str(self.base.device),
                    lease_seconds=self.lease_seconds,
                )
        except DBAPIError as exc:
            self.database_outage.failed(exc.orig if exc.orig is not None else exc)

    def _registry_heartbeat(self) -> None:
        try:
            with self.db.transaction() as session:
                found = workers.heartbeat(
                    session=session, worker_id=self.id, lease_seconds=self.lease_seconds
                )
            if not found:  # pruned as dead (a long database outage): back in
                self._register()
        except DBAPIError as exc:
            self.database_outage.failed(exc.orig if exc.orig is not None else exc)
        except Exception:
            log.exception("refreshing this worker's registry row failed")

    def _unregister(self) -> None:
        try:
            with self.db.transaction() as session:
                workers.unregister(session=session, worker_id=self.id)
        except Exception:  # the row goes dead by itself after a lease
            log.exception("removing this worker's registry row failed")

    def _renew_all(self, job_ids: list[str]) -> None:
        """The heartbeat: every held job's lease renewed in one transaction."""
        started = time.monotonic()
        lease = self.lease_seconds
        try:
            with self.db.transaction() as session:
                renewed = jobs.renew_leases(
                    session=session, job_ids=job_ids, worker_id=self.id, lease_seconds=lease
                )
        except DBAPIError as exc:  # stop stepping when the leases may lapse (_usable)
            self.database_outage.failed(exc.orig if exc.orig is not None else exc)
            return
        except Exception:
            log.exception("heartbeat for %d jobs failed", len(job_ids))
            return
        self.database_outage.ok()
        wake = False
        with self._lock:
            for job_id, record in renewed.items():
                h = self.held.get(job_id)
                if h is None:  # released meanwhile: nothing lost
                    continue
                if record is None:
                    log.warning(
                        "worker %s no longer holds job %s; stop training it", self.id, job_id
                    )
                    h.lost = True
                    continue
                h.lease_ok_until = started + lease
                h.requested = record.requested_action
                wake = wake or record.requested_action is not None
        if wake:
            self._wake.set()

    def _renew(self, job_id: str) -> None:
        started = time.monotonic()
        try:
            with self.db.transaction() as session:
                lease = self.lease_seconds
                record = jobs.renew_lease(
                    session=session, job_id=job_id, worker_id=self.id, lease_seconds=lease
                )
        except LeaseLostError as exc:
            with self._lock:
                if job_id in self.held:  # (else it was released meanwhile: nothing lost)
                    log.warning("%s", exc)
                    self.held[job_id].lost = True
            return
        except DBAPIError as exc:  # stop stepping when the lease may lapse (_usable)
            self.database_outage.failed(exc.orig if exc.orig is not None else exc)
            return
        except Exception:
            log.exception("heartbeat for %s failed", job_id)
            return
        self.database_outage.ok()
        with self._lock:
            h = self.held.get(job_id)
            if h is not None:
                h.lease_ok_until = started + lease
                h.requested = record.requested_action
        if record.requested_action is not None:
            self._wake.set()

    def _margin(self) -> float:
        """Lease time a job must have left to go into a step: the step's expected length
        and then some, but at most half a lease (longer steps renew before each step, and
        the heartbeat thread keeps renewing during it)."""
        lease = self.lease_seconds
        return min(0.5 * lease, 1.5 * self._last_step_wall + 0.1 * lease)

    def _trainable(self, h: Held) -> bool:
        return (
            not h.lost
            and h.job is not None
            and h.job.state == TrainingState.RUNNING
            and not h.job.done
        )

    def _usable(self, h: Held) -> bool:
        """Safe to step: the lease outlives the step by a margin (no double training)."""
        return self._trainable(h) and h.lease_ok_until - time.monotonic() > self._margin()

    def _renew_short_leases(self) -> None:
        margin = self._margin()
        for job_id, h in list(self.held.items()):
            if self._trainable(h) and h.lease_ok_until - time.monotonic() <= margin:
                self._renew(job_id)

    def _wakeups(self, done: threading.Event) -> None:
        while not done.is_set():
            try:
                if self.bus.wait_for_wake(1.0):
                    self._wake.set()
            except Exception:
                log.exception("progress bus wait failed")
                done.wait(self.settings.worker_poll_seconds)

    def _publish(self, job_id: str, after_seq: int) -> None:
        """Send a job's new events/metrics (already committed) to live streams."""
        try:
            with self.db.transaction() as session:
                new = jobs.progress_since(session=session, job_id=job_id, after_seq=after_seq)
            for record in new:
                self.bus.publish(job_id, record.to_message())
        except DBAPIError as exc:  # the database has them; streams catch up from it
            self.database_outage.failed(exc.orig if exc.orig is not None else exc)
        except Exception:
            log.exception("publishing progress of %s failed", job_id)

    # -- requests from the API ---------------------------------------------------------

    def _carry_out_requests(self) -> None:
        for h in list(self.held.values()):
            if h.lost:
                log.warning("dropping %s: its lease was lost", h.record.id)
                self._drop(h)
            elif h.job is None:
                continue
            elif h.job.state == TrainingState.SUCCEEDED:  # a retry
                if time.monotonic() >= h.upload_retry_at:
                    self._finish(h, h.job, self.training.validation_loss(h.record.id))
            elif h.job.state == TrainingState.FAILED:
                self._release(
                    h, JobStatus.FAILED, error={"message": h.job.error, "code": "training_failed"}
                )
            elif h.requested == RequestedAction.CANCEL:
                self._release(h, JobStatus.CANCELLED, f"Job cancelled at step {h.job.step}")
            elif h.requested == RequestedAction.PAUSE and h.job.micro_done == 0:
                self._pause(h, h.job)
            elif h.unuploaded is not None and time.monotonic() >= h.upload_retry_at:
                step, folder, metrics = h.unuploaded
                try:
                    self._record_checkpoint(h, step, folder, metrics)
                except DBAPIError:
                    raise
                except Exception as exc:
                    self._job_error(h, exc, f"uploading the checkpoint at step {step}")

    def _pause(self, h: Held, job: TrainingJob) -> None:
        step = job.step
        if step > max(h.last_ckpt_step, 0):
            try:
                if not self._checkpoint(h, job):
                    return
            except DBAPIError:
                raise
            except Exception as exc:
                self._job_error(h, exc, f"writing the checkpoint at step {step}")
                return
        self._release(
            h,
            JobStatus.PAUSED,
            f"Job paused at step {step} of {job.total_steps}; resume continues from there",
        )

    # -- claiming ----------------------------------------------------------------------

    def _admitted_state(self) -> int:
        return sum(h.state_bytes for h in self.held.values())

    def _fits(self, record: JobRecord, hp: Any) -> memory.Admission:
        dpo = Method.model_validate(record.method).objective == "dpo"
        return memory.admit(
            self.shape,
            hp,
            budget=self.budget,
            admitted_state=self._admitted_state(),
            rows_per_example=2 if dpo else 1,  # a pair is two sequences
        )

    def _claim(self) -> None:
        while len(self.held) < self.settings.worker_max_jobs:
            claimed_at = time.monotonic()  # before the lease starts: a conservative clock
            with self.db.transaction() as session:
                result = claim_next(
                    session=session,
                    worker_id=self.id,
                    lease_seconds=self.lease_seconds,
                    model=self.model_id,
                    fits=self._fits,
                    default_max_running=self.settings.max_running_jobs,
                    notified=self._notified,
                )
            worker_metrics().claimed(
                time.monotonic() - claimed_at, claimed=result.claimed is not None
            )
            for job_id, seq in result.touched:
                self._publish(job_id, seq)
            if result.claimed is None:
                return
            self._start(result.claimed, claimed_at)

    def _start(self, record: JobRecord, claimed_at: float) -> None:
        """Load the job's data and start it in the training session (from its last
        checkpoint, if it has one)."""
        stale = self.held.get(record.id)
        if stale is not None:  # its lease expired under us (a database outage): start afresh
            stale.lost = True
            self._drop(stale)
        hp = hyperparameters(record)
        self._orders += 1
        h = Held(
            record,
            None,
            self._orders,
            memory.job_state_bytes(self.shape, hp),
            claimed_at + self.lease_seconds,
        )
        with self._lock:
            self.held[record.id] = h
        try:
            with self.db.transaction() as session:
                train = files.get_file(session=session, file_id=record.training_file_id)
                val = (
                    files.get_file(session=session, file_id=record.validation_file_id)
                    if record.validation_file_id
                    else None
                )
                recorded = jobs.last_checkpoint_step(session=session, job_id=record.id)
            preference = Method.model_validate(record.method).preference
            # this worker's copies (the store's when it is S3, the files themselves locally)
            cache = self.settings.data_dir
            rows = self.training.encode(
                objects.fetch(self.store, train.path, cache), hp, preference
            )
            val_rows: Any = (
                self.training.encode(objects.fetch(self.store, val.path, cache), hp, preference)
                if val
                else []
            )
            folder = jobs_dir(self.settings) / record.id
            fetch_checkpoints(
                self.store, checkpoint_key(record.id), folder / "checkpoints", at_most=recorded
            )
            job = self.training.add(
                record.id,
                hp,
                preference=preference,
                seed=record.seed,
                rows=rows,
                validation_rows=val_rows,
                folder=folder,
                # a checkpoint written but never recorded (the worker died in between)
                # lacks its step's metrics row: train from the last recorded one
                resume_at_most=recorded,
            )
        except DBAPIError:
            raise
        except StoreUnavailableError as exc:  # back in the queue; claims wait a while
            log.warning("%s: the object store is unreachable: %s", record.id, exc)
            self._store_back_at = time.monotonic() + self.settings.storage_retry_max_seconds
            self._release(
                h,
                JobStatus.QUEUED,
                "Job start waits: object store unreachable while fetching its data or "
                "checkpoint; queued again",
                level="warning",
            )
            return
        except Exception as exc:
            if isinstance(exc, DataError) or (
                isinstance(exc, OSError) and storage_problem(exc) is None
            ):
                self._release(
                    h,
                    JobStatus.FAILED,
                    error={"message": str(exc), "code": "invalid_training_data", "param": None},
                )
            else:
                self._job_error(h, exc, "starting the job")
            return
        h.job = job
        h.last_ckpt_step = job.step if job.step else -1
        resume = self.training.resumes[record.id]
        params = sum(p.numel() for p in self.training.model.adapter_parameters(record.id))
        where = f"resuming from the checkpoint at step {job.step}" if job.step else "from scratch"
        corrupt = resume.describe()
        if corrupt is not None:
            log.warning("%s: %s", record.id, corrupt)
        later: list[CheckpointRecord] = []

        def start(session: Any) -> None:
            later.extend(jobs.resume_at(session=session, job_id=record.id, step=job.step))
            if corrupt is not None:
                jobs.add_event(
                    session=session,
                    job_id=record.id,
                    message=corrupt[:1].upper() + corrupt[1:],
                    level="warning",
                    data={"corrupt_steps": [n for n, _ in resume.corrupt]},
                )
            jobs.add_event(
                session=session,
                job_id=record.id,
                message=f"Training on a worker: {len(rows)} rows, {job.total_steps} steps "
                f"({hp.n_epochs} epoch(s)), {params:,} trainable parameters; {where}",
                data={"rows": len(rows), "total_steps": job.total_steps, "resumed_step": job.step},
            )

        if not self._leased(h, start):
            return
        self._remove_stored(later)
        log.info("%s: started on worker %s (%s)", record.id, self.id, where)
        if job.state == TrainingState.SUCCEEDED:  # a worker died after the final checkpoint
            self._finish(h, job, self.training.validation_loss(record.id))

    # -- stepping ----------------------------------------------------------------------

    def _compose(self) -> list[str]:
        self._renew_short_leases()
        candidates = []
        for h in self.held.values():
            if h.job is None or not self._usable(h):
                continue
            examples, _ = h.job.next_micro_batch()
            rows = sequence_rows(examples)
            candidates.append(
                Candidate(
                    name=h.record.id,
                    tenant_id=h.record.tenant_id,
                    rows=len(rows),
                    width=max(len(r.input_ids) for r in rows),
                    last_served=h.last_served,
                    order=h.order,
                )
            )
        if not candidates:
            return []

        def activation(c: Candidate, width: int) -> int:
            hp = self.training.jobs[c.name].hp
            return memory.activation_bytes(self.shape, hp, c.rows, width, targets=c.rows * width)

        free = self.budget - self.shape.base_bytes - self._admitted_state()
        return compose_step(
            candidates, token_budget=self.token_budget, memory_free=free, activation=activation
        )

    def _step(self, names: list[str]) -> None:
        started = time.monotonic()
        try:
            result = self.training.step(names)
        except Exception as exc:
            self.training.rollback(names)
            if is_out_of_memory(exc):
                self._out_of_memory(names, exc)
            else:
                self._find_culprit(names, exc)
            return
        self._stepped_all(result, time.monotonic() - started)

    def _find_culprit(self, names: list[str], exc: BaseException) -> None:
        """After the session undid a fused step that raised (not out of memory): each of its
        jobs steps alone once; a job whose own step raises fails with its error, the others
        have taken their step (alone, what the fused step would have given them)."""
        log.warning("a fused step of %d job(s) raised; stepping each alone: %r", len(names), exc)
        for name in names:
            h = self.held.get(name)
            if h is None or not self._usable(h):
                continue
            started = time.monotonic()
            try:
                result = self.training.step([name])
            except Exception as alone:
                self.training.rollback([name])
                if is_out_of_memory(alone):
                    continue  # the fused step's budget backs off when it happens again
                log.error("%s: its training step raised", name, exc_info=alone)
                self._release(
                    h,
                    JobStatus.FAILED,
                    error={
                        "message": f"a training step of this job raised "
                        f"{type(alone).__name__}: {alone}",
                        "code": "training_error",
                    },
                )
                continue
            self._stepped_all(result, time.monotonic() - started)

    def _stepped_all(self, result: SessionStep, wall_seconds: float) -> None:
        """`wall_seconds`: the whole step as the lease saw it (the fused step, and the
        checkpoints and validation the session ran after it)."""
        self.steps += 1
        self._last_step_seconds = result.report.seconds
        worker_metrics().stepped(tokens=result.report.tokens, seconds=result.report.seconds)
        self._last_step_wall = wall_seconds
        self._size_lease(wall_seconds)
        for s in result.jobs:
            h = self.held.get(s.name)
            if h is None:
                continue
            h.last_served = self.steps
            h.oom_alone = 0
            if s.job.state == TrainingState.FAILED:
                self._release(
                    h,
                    JobStatus.FAILED,
                    error={"message": s.job.error or "failed", "code": "training_failed"},
                )
            elif s.metrics is not None:
                self._stepped(h, s)

    def _stepped(self, h: Held, s: JobStep) -> None:
        """A job's optimizer step completed: its metrics (every metrics_interval_seconds, at
        a checkpoint and at the end), the checkpoint written at it, its result."""
        assert s.metrics is not None
        now = time.monotonic()
        interval = self.settings.worker_metrics_interval_seconds
        due = s.checkpoint is not None or s.checkpoint_error is not None
        if s.job.done or due or now - h.last_metrics_at >= interval:
            h.last_metrics_at = now
            if not self._metrics(h, s.step, s.metrics):
                return
        if s.checkpoint_error is not None:
            if isinstance(s.checkpoint_error, DBAPIError):  # the next checkpoint will do
                log.error("%s: no checkpoint at step %d", h.record.id, s.step, exc_info=True)
            else:
                self._job_error(h, s.checkpoint_error, f"writing the checkpoint at step {s.step}")
                return
        if s.checkpoint is not None:
            try:
                if not self._record_checkpoint(h, s.step, s.checkpoint):
                    return
            except DBAPIError:
                raise
            except Exception as exc:
                self._job_error(h, exc, f"recording the checkpoint at step {s.step}")
                return
        if s.job.done:
            self._finish(h, s.job, s.valid_loss)

    def _metrics(self, h: Held, step: int, values: dict[str, Any]) -> bool:
        """Store a step's metrics if the lease is still ours (a worker that lost it, frozen
        past its lease, writes nothing the job's new holder will write again). While the
        database is away the rows wait here and go with the next write (False: not
        stored now, or the lease is lost)."""
        h.unstored_metrics.append((step, values))
        rows = list(h.unstored_metrics)
        try:
            ok = self._leased(h, lambda s: _store_metrics(s, h.record.id, rows))
        except DBAPIError as exc:
            self.database_outage.failed(exc.orig if exc.orig is not None else exc)
            return False
        del h.unstored_metrics[: len(rows)]  # committed (or the lease is lost: not ours)
        return ok

    def _out_of_memory(self, names: list[str], exc: BaseException) -> None:
        """After the session undid the failed step: retry with half the token budget; a job
        that does not fit even alone, OOM_RETRIES_ALONE times, fails."""
        old = self.token_budget
        self.token_budget = max(MIN_TOKEN_BUDGET, old // 2)
        log.warning("out of memory in a step of %d job(s): %s", len(names), exc)
        for name in names:
            h = self.held[name]
            if len(names) == 1:
                h.oom_alone += 1
                if h.oom_alone >= OOM_RETRIES_ALONE:
                    self._release(
                        h,
                        JobStatus.FAILED,
                        error={
                            "message": f"out of memory even when trained alone "
                            f"({h.oom_alone} tries); lower micro_batch_size or max_seq_len",
                            "code": "out_of_memory",
                        },
                    )
                    continue
            self._event(
                h,
                f"Out of memory in a fused step of {len(names)} job(s); retrying the step "
                f"with a budget of {self.token_budget} tokens (was {old})",
                level="warning",
            )
        time.sleep(min(1.0, self.settings.worker_poll_seconds))

    # -- checkpoints and results -------------------------------------------------------

    def _check_storage(self, h: Held, adding: int, what: str) -> None:
        """QuotaExceededError when the tenant's storage quota has no room for `adding`."""
        with self.db.transaction() as session:
            tenants.check_storage(
                session=session,
                tenant_id=h.record.tenant_id,
                default_max_bytes=self.settings.max_tenant_bytes,
                adding=adding,
                what=what,
            )

    def _before_checkpoint(self, name: str, step: int) -> None:
        """The session's hook before it writes a due checkpoint: the quota, first."""
        h = self.held[name]
        estimate = self.training.checkpoint_estimate(name)
        self._check_storage(h, estimate, f"the checkpoint at step {step}")

    def _keep_checkpoints(self, h: Held) -> int:
        """The operator's keep_checkpoints, or fewer if the job asks."""
        asked = hyperparameters(h.record).keep_checkpoints
        keep = self.settings.keep_checkpoints
        return min(asked, keep) if asked is not None else keep

    def _checkpoint(self, h: Held, job: TrainingJob) -> bool:
        """Checkpoint the job now (between optimizer steps) and record it."""
        self._before_checkpoint(h.record.id, job.step)
        return self._record_checkpoint(h, job.step, self.training.checkpoint(h.record.id))

    def _record_checkpoint(
        self, h: Held, step: int, folder: Path, metrics: dict[str, Any] | None = None
    ) -> bool:
        """Put a written checkpoint into the object store and record it (its folder, stored
        once: downloads zip it as they stream) with its size, if the lease is still ours;
        then drop the checkpoints past retention (keep_checkpoints). The store unreachable:
        the checkpoint stays here and its upload is retried (_upload_failed); True."""
        size = stored_bytes(folder)
        if metrics is None:
            metrics = self.training.checkpoint_metrics(h.record.id)
        if h.unuploaded is not None and h.unuploaded[0] < step:  # superseded by this one
            self._forget_unuploaded(h)
        try:
            path = upload_checkpoint(self.store, folder, checkpoint_key(h.record.id, step))
        except StoreUnavailableError as exc:
            h.unuploaded = (step, folder, metrics)
            self._upload_failed(h, step, exc)
            return True
        self._uploaded(h)
        dropped: list[CheckpointRecord] = []

        def write(session: Any) -> None:
            jobs.add_checkpoint(
                session=session,
                job_id=h.record.id,
                step=step,
                path=path,
                metrics=metrics,
                bytes=size,
            )
            dropped.extend(
                jobs.retain_checkpoints(
                    session=session, job_id=h.record.id, keep_last=self._keep_checkpoints(h)
                )
            )

        ok = self._leased(h, write)
        if ok:
            h.last_ckpt_step = step
            self._remove_stored(dropped)
        return ok

    def _upload_failed(self, h: Held, step: int, exc: StoreUnavailableError) -> None:
        """A checkpoint's upload failed with the store unreachable: the job trains on, its
        checkpoint stays on this worker and is uploaded again after a back-off (doubling,
        storage_retry_seconds to storage_retry_max_seconds); one event per outage."""
        first = h.upload_wait == 0
        settings = self.settings
        h.upload_wait = min(
            max(2 * h.upload_wait, settings.storage_retry_seconds),
            settings.storage_retry_max_seconds,
        )
        h.upload_retry_at = time.monotonic() + h.upload_wait
        log.warning(
            "%s: checkpoint at step %d not uploaded (%s); retrying in %.0f s",
            h.record.id,
            step,
            exc,
            h.upload_wait,
        )
        if first:
            self._event(
                h,
                "Checkpoint upload failed: store unreachable; retrying (the checkpoint at "
                f"step {step} stays on the worker until it is uploaded; training goes on)",
                level="warning",
                data={"step": step},
            )

    def _uploaded(self, h: Held) -> None:
        if h.upload_wait:
            log.info("%s: the object store is back; checkpoints upload again", h.record.id)
        h.upload_wait = 0.0
        h.upload_retry_at = -math.inf
        self._delete_unrecorded(h)

    def _forget_copy(self, folder: Path) -> None:
        """This worker's copy of checkpoints it no longer needs (superseded before they
        were uploaded, or of a job that succeeded), when the store is elsewhere (locally,
        the copy is the stored checkpoint)."""
        if not isinstance(self.store, objects.LocalStore):
            shutil.rmtree(folder, ignore_errors=True)

    def _forget_unuploaded(self, h: Held) -> None:
        """Drop a checkpoint that was never uploaded whole (a newer one is recorded): this
        worker's copy, and what a cut upload may have left in the store without its
        manifest (which readers ignore), as far as the store answers now."""
        assert h.unuploaded is not None
        step, folder, _ = h.unuploaded
        h.unuploaded = None
        self._forget_copy(folder)
        h.unrecorded.append(step)
        self._delete_unrecorded(h)

    def _delete_unrecorded(self, h: Held) -> None:
        for step in list(h.unrecorded):
            try:
                self.store.delete_prefix(checkpoint_key(h.record.id, step) + "/")
            except (OSError, StoreUnavailableError):
                return  # the store is still away: after the next upload that succeeds
            h.unrecorded.remove(step)

    def _remove_stored(self, records: list[CheckpointRecord]) -> None:
        """After commit: the stored checkpoints of deleted rows, and this worker's copies."""
        paths = [c.path for c in records]
        jobs.remove_stored_files(paths, store=self.store)
        if isinstance(self.store, objects.S3Store):
            copies = [
                str(self.settings.data_dir / key)
                for p in paths
                if (key := self.store.key_of(p)) is not None
            ]
            jobs.remove_stored_files(copies, store=objects.LocalStore(self.settings.data_dir))

    def _finish(self, h: Held, job: TrainingJob, val: float | None) -> None:
        """The final checkpoint and the job's result; a write that fails pauses or fails this
        job alone (_job_error). The final checkpoint's folder is the job's adapter too: the
        adapter counts its adapter files, the checkpoint the trainer state beside them."""
        try:
            if h.final is None:  # (else written already; its upload is retried)
                estimate = self.training.checkpoint_estimate(h.record.id)
                self._check_storage(h, estimate, f"the final adapter at step {job.step}")
                h.final = self.training.finish(h.record.id)
            folder = h.final
            adapter_bytes = archives.adapter_bytes(folder)
            ckpt_bytes = stored_bytes(folder) - adapter_bytes
            path = upload_checkpoint(self.store, folder, checkpoint_key(h.record.id, job.step))
            self._uploaded(h)
            if h.unuploaded is not None:  # superseded by the final one
                self._forget_unuploaded(h)
        except DBAPIError:
            raise
        except StoreUnavailableError as exc:  # the job waits for the store, done
            self._upload_failed(h, job.step, exc)
            return
        except Exception as exc:
            self._job_error(h, exc, f"writing the final adapter at step {job.step}")
            return
        name = fine_tuned_model_id(
            base=served_base_id(self.settings),
            org=h.record.tenant_id,
            suffix=h.record.suffix,
            job_id=h.record.id,
        )
        evaluation = self._evaluate(h, name) if h.record.evaluation else None
        took = time.time() - (h.record.started_at.timestamp() if h.record.started_at else 0)
        text = (
            f"Job succeeded: {job.step} steps, {job.tokens_seen:,} tokens"
            + (f", validation loss {val:.4f}" if val is not None else "")
            + f"; adapter ready to download ({took:.0f} s since it first started)"
        )

        dropped: list[CheckpointRecord] = []

        def write(session: Any) -> None:
            _store_metrics(session, h.record.id, h.unstored_metrics)
            jobs.add_checkpoint(
                session=session,
                job_id=h.record.id,
                step=job.step,
                path=path,
                metrics={"valid_loss": val} if val is not None else None,
                bytes=ckpt_bytes,
            )
            dropped.extend(
                jobs.retain_checkpoints(
                    session=session, job_id=h.record.id, keep_last=self._keep_checkpoints(h)
                )
            )
            jobs.set_adapter_path(
                session=session,
                job_id=h.record.id,
                path=path,
                fine_tuned_model=name,
                trained_tokens=job.tokens_seen,
                bytes=adapter_bytes,
            )
            if evaluation is not None:
                jobs.set_evaluation(session=session, job_id=h.record.id, evaluation=evaluation)
                jobs.add_event(
                    session=session,
                    job_id=h.record.id,
                    message=evaluation_summary(evaluation),
                    level="info" if evaluation["status"] == "succeeded" else "warning",
                    type="evaluation",
                )
            jobs.release_job(
                session=session,
                job_id=h.record.id,
                worker_id=self.id,
                status=JobStatus.SUCCEEDED,
                message=text,
            )

        if self._leased(h, write):
            self._remove_stored(dropped)
            log.info("%s: succeeded", h.record.id)
            self._drop(h)
            self._forget_copy(jobs_dir(self.settings) / h.record.id)  # all in the store now

    def _evaluate(self, h: Held, model_name: str) -> dict[str, Any]:
        """The job's trained adapter (still loaded) and the base scored on the tasks it asked
        for (mixloom/eval), the base's scores kept for the next job that asks the same. A
        failure here is the evaluation's, never the job's: it succeeds with the error kept."""
        evaluation = dict(h.record.evaluation or {})
        request = evaluation.get("request", {})
        try:
            results = evaluate_job(
                self.training.model,
                self.base.tokenizer,
                h.record.id,
                [self._task_source(t) for t in request["tasks"]],
                request,
                base_scores=self._base_scores,
                rendering=self.training.rendering(h.record.id),
            )
        except Exception as exc:  # a bad task file, or a bug: the job stands
            log.warning("%s: evaluation failed: %s", h.record.id, exc)
            code = getattr(exc, "code", None) or "evaluation_failed"
            evaluation.update(status="failed", error={"message": str(exc), "code": code})
            return evaluation
        for r in results:
            if r["model"] == h.record.id:
                r["model"] = model_name
        evaluation.update(status="succeeded", results=results)
        return evaluation

    def _task_source(self, task: str) -> str:
        """A built-in task's name as it is, or the path of the tenant's "evals" file."""
        if not task.startswith("file-"):
            return task
        with self.db.read() as session:
            location = files.get_file(session=session, file_id=task).path
        return str(objects.fetch(self.store, location, self.settings.data_dir))

    def _job_error(self, h: Held, exc: BaseException, doing: str) -> None:
        """An error in work on this job alone (not the fused step): the job stops, the
        worker goes on. Storage full, read-only or failing, or the tenant's quota: paused,
        to resume from its last checkpoint when space is freed; anything else: failed."""
        if isinstance(exc, QuotaExceededError):
            log.warning("%s: %s refused: %s", h.record.id, doing, exc)
            self._release(
                h,
                JobStatus.PAUSED,
                f"Job paused while {doing}: {exc}; then resume the job",
                level="warning",
            )
            return
        problem = storage_problem(exc)
        if problem is not None:
            log.warning("%s: storage unavailable while %s: %s", h.record.id, doing, exc)
            self._release(
                h,
                JobStatus.PAUSED,
                f"Job paused: storage unavailable: {problem}, while {doing}; resume it when "
                "space is freed (it continues from its last checkpoint)",
                level="warning",
            )
            return
        log.error("%s: %s failed", h.record.id, doing, exc_info=exc)
        self._release(
            h,
            JobStatus.FAILED,
            error={
                "message": f"{doing} failed: {type(exc).__name__}: {exc}",
                "code": "worker_error",
            },
        )

    def _leased(self, h: Held, write: Any) -> bool:
        """Run `write(session)` in a transaction that first checks our lease; publish after."""
        seq = h.record.last_seq
        try:
            with self.db.transaction() as session:
                before = jobs.renew_lease(
                    session=session,
                    job_id=h.record.id,
                    worker_id=self.id,
                    lease_seconds=self.lease_seconds,
                )
                seq = before.last_seq
                write(session)
        except LeaseLostError as exc:
            log.warning("%s", exc)
            h.lost = True
            self._drop(h)
            return False
        self.database_outage.ok()  # a write committed: the database is back, if it was away
        self._publish(h.record.id, seq)
        return True

    def _event(self, h: Held, message: str, *, level: str = "info", data: Any = None) -> None:
        self._leased(
            h,
            lambda s: jobs.add_event(
                session=s, job_id=h.record.id, message=message, level=level, data=data
            ),
        )

    def _release(
        self,
        h: Held,
        status: JobStatus,
        message: str | None = None,
        *,
        error: dict[str, Any] | None = None,
        level: str | None = None,
    ) -> None:
        if error is not None:
            error.setdefault("param", None)
        self._leased(
            h,
            lambda s: jobs.release_job(
                session=s,
                job_id=h.record.id,
                worker_id=self.id,
                status=status,
                message=message,
                error=error,
                level=level,
            ),
        )
        log.info("%s: released as %s", h.record.id, status.value)
        self._drop(h)

    def _drop(self, h: Held) -> None:
        """Forget the job here (its adapter weights and optimizer state are freed)."""
        with self._lock:
            self.held.pop(h.record.id, None)
        if h.record.id in self.training.jobs:
            self.training.remove(h.record.id)

    def _shutdown(self) -> None:
        """Checkpoint what can be checkpointed and put every held job back in the queue;
        the inference requests in flight fail (with a message to send them again)."""
        if self.inference is not None:
            try:
                self.inference.close()
            except Exception:
                log.exception("ending the inference requests at shutdown failed")
        for h in list(self.held.values()):
            job = h.job
            if h.lost or job is None:
                self._drop(h)
                continue
            try:
                if job.micro_done == 0 and job.step > max(h.last_ckpt_step, 0):
                    try:
                        self._checkpoint(h, job)
                    except DBAPIError:
                        raise
                    except Exception:  # queued anyway: it resumes from an earlier one
                        log.exception("%s: checkpoint at shutdown failed", h.record.id)
                if h.record.id in self.held:
                    self._release(
                        h,
                        JobStatus.QUEUED,
                        f"A worker shut down at step {job.step}; queued again, "
                        "it resumes from its last checkpoint",
                    )
            except Exception:
                log.exception("releasing %s at shutdown failed; its lease will expire", h.record.id)
        self.bus.wake()


def _store_metrics(session: Any, job_id: str, rows: list[tuple[int, dict[str, Any]]]) -> None:
    for step, values in rows:
        jobs.add_metrics(session=session, job_id=job_id, step=step, values=values)
