"""The fleet simulation: many workers claiming, leasing and finishing thousands of tenants'
jobs on the real Postgres, through the real scheduler and storage code, with the model left
out (a step sleeps for a measured step time).

What is real: `scheduler.queue.claim_next` (fair-share order, per-tenant running caps,
memory admission by `scheduler.memory.admit` on a LLaMA-2-7B-shaped bf16 base and an H200's
budget), `scheduler.policy.compose_step` (which held jobs share each fused step within the
token budget), and `storage.jobs`' lease protocol (`renew_leases` from a heartbeat thread per
worker, one transaction a heartbeat for all its jobs as the worker does; `expire_leases`; `release_job` behind a
lease check; `add_checkpoint`; `last_checkpoint_step` + `resume_at` when a job starts). Each
worker is a thread with its own database connections and transactions, spread over a few
processes; some workers are killed mid-run (they stop dead: no release, no heartbeat), so
their leases expire and other workers take their jobs over from their last checkpoint, and
a replacement worker starts a little later.

What is simulated: a fused step sleeps for the time mixloom measured for that many jobs
(bench/RESULTS.md, "2026-11-29 01:20-01:22 UTC, CPU proxy, commit 563567d": 1.082 s at 1
job, 1.031 s at 4, 1.271 s at 16; linear between, flat past 16; times 0.9-1.1 noise), times
`--scale`. Every duration the worker uses is scaled alike: the lease (worker_lease_seconds),
heartbeat, claim poll, expiry sweep and idle wait, and the pod restart. Times reported are
simulated seconds (divide by the scale for real ones). Left out: the per-job metrics rows the
real worker writes every worker_metrics_interval_seconds, the bus, and lease sizing from step
times (the steps here are far shorter than a lease).

The jobs: `--tenants` tenants, `--jobs` jobs, every tenant at least one and the rest by a
Zipf(1) law (a few heavy tenants, most light), all queued when the run starts (submitted
over the hour before, in that order), each with a length in optimizer steps drawn from a
log-normal law (median `--steps`, sigma 0.8) and its own LoRA or MixLoRA hyperparameters.
A row ends when every job has succeeded, or at `--timeout` simulated seconds (the done
column says how many had). A worker holds up to `--max-jobs` jobs (8 here; the worker's
default worker_max_jobs is 32, whose heartbeats alone, one transaction per job, would ask
this 2-core machine for 64 x 32 / 2.5 s = 820 transactions a second at 64 workers).

    python bench/fleet.py                    # 1,000 tenants, 10,000 jobs, 8 16 32 64 workers
    python bench/fleet.py --quick            # a 2-minute smoke run
    python bench/fleet.py --workers 64       # one row
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import event, func, insert, select, text

from mixloom.config import get_settings
from mixloom.jobspec import Method
from mixloom.scheduler import memory
from mixloom.scheduler.policy import Candidate, compose_step
from mixloom.scheduler.queue import claim_next, hyperparameters
from mixloom.storage import jobs, migrate
from mixloom.storage import models as m
from mixloom.storage.db import Database
from mixloom.storage.records import JobRecord, JobStatus
from mixloom.storage.testing import fresh_postgres_database

MODEL = "fleet-base"
# (jobs in the fused step, seconds): mixloom's CPU proxy rows, RESULTS.md 2026-11-29 01:20
MEASURED_STEP_S = ((1, 1.082), (4, 1.031), (16, 1.271))
# LLaMA-2-7B in bf16 on an H200 (90% of 141 GiB, the worker's default budget on CUDA)
SHAPE = memory.ModelShape(
    layers=32,
    hidden=4096,
    intermediate=11008,
    heads=32,
    kv_heads=32,
    head_dim=128,
    vocab=32000,
    dtype_bytes=2,
    base_bytes=6_738_415_616 * 2,
    recompute=True,  # the GPU path's default
)
BUDGET = int(0.9 * 141 * memory.GIB)
RESTART_S = 10.0  # a killed worker's replacement starts this long after (real seconds)


@dataclass
class Params:
    tenants: int = 1000
    jobs: int = 10_000
    workers: int = 8
    max_jobs: int = 8  # jobs a worker holds at once (worker_max_jobs)
    scale: float = 0.25  # simulated seconds per real second
    steps: float = 3.0  # median optimizer steps per job
    checkpoint_every: int = 4
    kill: float = 0.125  # share of workers killed mid-run (at least one)
    kill_at: float = 0.3  # when, as a share of the expected run
    processes: int = 2
    connections: int = 20  # database connections per process
    seed: int = 0
    timeout: float = 200.0  # a row stops here (simulated seconds), done or not


# --- the jobs -----------------------------------------------------------------------------


def _method(rng: random.Random) -> dict[str, Any]:
    # at most 4,096 tokens a micro-batch: every job fits a worker alone (memory.admit)
    mb, width = rng.choice([(1, 512), (1, 1024), (2, 1024), (1, 2048), (2, 2048), (4, 1024)])
    hp: dict[str, Any] = {
        "r": rng.choice([8, 16, 16, 32, 64]),
        "micro_batch_size": mb,
        "max_seq_len": width,
    }
    kind = "lora"
    if rng.random() < 0.25:
        kind = "mixlora"
        hp["num_experts"] = rng.choice([4, 8])
        hp["r"] = min(hp["r"], 16)
    return Method.model_validate({"type": kind, kind: {"hyperparameters": hp}}).to_json()


def seed_database(db: Database, p: Params) -> dict[str, int]:
    """Tenants, a file each and the jobs, all queued; returns each job's length in steps
    (also in its metadata, so a worker process reads it from the job)."""
    rng = random.Random(p.seed)
    np_rng = np.random.default_rng(p.seed)
    now = datetime.now(UTC)
    tenants = [f"tenant-fleet{i:05d}" for i in range(p.tenants)]
    weights = 1.0 / np.arange(1, p.tenants + 1)
    extra = np_rng.multinomial(max(p.jobs - p.tenants, 0), weights / weights.sum())
    per_tenant = [1 + int(x) for x in extra][: p.jobs]
    steps: dict[str, int] = {}
    job_rows: list[dict[str, Any]] = []
    for t, count in zip(tenants, per_tenant, strict=False):
        for _ in range(count):
            job_id = f"ftjob-fleet{len(job_rows):06d}"
            n = int(min(max(1, round(np_rng.lognormal(math.log(p.steps), 0.8))), 20 * p.steps))
            steps[job_id] = n
            submitted = now - timedelta(seconds=rng.uniform(0, 3600))
            job_rows.append(
                dict(
                    id=job_id,
                    tenant_id=t,
                    model=MODEL,
                    training_file_id=f"file-{t}",
                    validation_file_id=None,
                    method=_method(rng),
                    seed=rng.randrange(2**31),
                    meta={"fleet_steps": n},
                    status=JobStatus.QUEUED.value,
                    created_at=submitted,
                    updated_at=submitted,
                    queued_at=submitted,
                    attempts=0,
                    crashes=0,
                    last_seq=0,
                )
            )
    with db.transaction() as s:
        s.execute(
            insert(m.Tenant),
            [dict(id=t, name=t, created_at=now) for t in tenants],
        )
        s.execute(
            insert(m.File),
            [
                dict(
                    id=f"file-{t}",
                    tenant_id=t,
                    filename="train.jsonl",
                    purpose="fine-tune",
                    bytes=1,
                    rows=1,
                    sha256="0" * 64,
                    path="/dev/null",
                    status="processed",
                    created_at=now,
                )
                for t in tenants
            ],
        )
        for i in range(0, len(job_rows), 2000):
            s.execute(insert(m.Job), job_rows[i : i + 2000])
    with db.engine.connect() as conn:
        conn.execute(text("ANALYZE"))  # as autovacuum would soon
        conn.commit()
    return steps


def step_seconds(n_jobs: int, scale: float, rng: random.Random) -> float:
    xs, ys = zip(*MEASURED_STEP_S, strict=True)
    base = float(np.interp(n_jobs, xs, ys))
    return base * rng.uniform(0.9, 1.1) * scale


# --- a simulated worker -------------------------------------------------------------------


@dataclass
class Held:
    record: JobRecord
    steps: int  # the job's length
    done: int  # steps trained (from its last checkpoint when it started)
    rows: int
    width: int
    state_bytes: int
    order: int
    lease_ok_until: float
    hold: int  # index in the log's holds
    last_served: int = -1
    lost: bool = False


@dataclass
class Log:
    """What one process saw; times are time.monotonic() (shared by the processes)."""

    claims: list[tuple[float, float, bool]] = field(default_factory=list)  # start, s, took one
    # job, tenant, worker, claimed at, ended at, how ("succeeded", "lost", "killed"), attempt
    holds: list[list[Any]] = field(default_factory=list)
    steps: list[tuple[str, str, float, float]] = field(default_factory=list)  # job, worker, t0, t1
    expired: int = 0
    kills: list[tuple[str, float, list[str]]] = field(default_factory=list)  # worker, t, jobs
    errors: list[str] = field(default_factory=list)


class SimWorker:
    def __init__(
        self, wid: str, db: Database, p: Params, log: Log, lock: threading.Lock, stop: Any
    ) -> None:
        s = get_settings()
        self.id, self.db, self.p, self.log, self.lock, self.stop = wid, db, p, log, lock, stop
        self.lease = s.worker_lease_seconds * p.scale
        self.heartbeat = s.worker_heartbeat * p.scale
        self.poll = s.worker_poll_seconds * p.scale
        self.expire_every = min(s.worker_lease_seconds / 2, 5.0) * p.scale
        self.idle = min(s.worker_poll_seconds, 0.5) * p.scale
        self.token_budget = s.worker_step_token_budget
        self.max_crashes = s.worker_max_crashes
        self.max_running = s.max_running_jobs
        self.held: dict[str, Held] = {}
        self.killed = threading.Event()
        self.notified: set[str] = set()
        self.rng = random.Random(f"{p.seed}-{wid}")
        self.n_steps = 0
        self.orders = 0
        self.last_step_wall = 0.0
        self._held_lock = threading.Lock()

    def alive(self) -> bool:
        return not self.killed.is_set() and not self.stop.is_set()

    def run(self) -> None:
        beats = threading.Thread(target=self._heartbeats, daemon=True)
        beats.start()
        last_expire = last_claim = -math.inf
        try:
            while self.alive():
                now = time.monotonic()
                if now - last_expire >= self.expire_every:
                    last_expire = now
                    self._expire()
                for h in [h for h in self.held.values() if h.lost]:
                    self._end(h, "lost")
                if now - last_claim >= self.poll:
                    last_claim = now
                    self._claim()
                if not self._step():
                    self.killed.wait(self.idle)
        except Exception as exc:  # a bug in the simulation: keep it, the run reports it
            with self.lock:
                self.log.errors.append(f"{self.id}: {type(exc).__name__}: {exc}")
        beats.join()

    def kill(self) -> None:
        t = time.monotonic()
        self.killed.set()
        with self.lock:
            self.log.kills.append((self.id, t, list(self.held)))
        for h in list(self.held.values()):
            self._end(h, "killed", t)

    def _end(self, h: Held, how: str, t: float | None = None) -> None:
        with self._held_lock:
            self.held.pop(h.record.id, None)
        with self.lock:
            self.log.holds[h.hold][4] = t or time.monotonic()
            self.log.holds[h.hold][5] = how

    # -- the lease protocol ------------------------------------------------------------

    def _expire(self) -> None:
        with self.db.transaction() as s:
            expired = jobs.expire_leases(session=s, max_crashes=self.max_crashes)
        with self.lock:
            self.log.expired += len(expired)

    def _heartbeats(self) -> None:
        while not self.killed.wait(self.heartbeat) and not self.stop.is_set():
            with self._held_lock:
                ids = [i for i, h in self.held.items() if not h.lost]
            if not ids or not self.alive():
                continue
            started = time.monotonic()
            with self.db.transaction() as s:
                renewed = jobs.renew_leases(
                    session=s, job_ids=ids, worker_id=self.id, lease_seconds=self.lease
                )
            with self._held_lock:
                for job_id, record in renewed.items():
                    h = self.held.get(job_id)
                    if h is None:
                        continue
                    if record is None:
                        h.lost = True
                    else:
                        h.lease_ok_until = started + self.lease

    def _leased(self, h: Held, write: Any) -> bool:
        """`write(session)` in a transaction that first renews (checks) the lease."""
        started = time.monotonic()
        try:
            with self.db.transaction() as s:
                jobs.renew_lease(
                    session=s, job_id=h.record.id, worker_id=self.id, lease_seconds=self.lease
                )
                write(s)
        except jobs.LeaseLostError:
            h.lost = True
            return False
        h.lease_ok_until = started + self.lease
        return True

    # -- claiming ----------------------------------------------------------------------

    def _fits(self, record: JobRecord, hp: Any) -> memory.Admission:
        return memory.admit(
            SHAPE,
            hp,
            budget=BUDGET,
            admitted_state=sum(h.state_bytes for h in self.held.values()),
        )

    def _claim_once(self, session: Any = None) -> JobRecord | None:
        if session is None:
            with self.db.transaction() as s:
                return self._claim_once(s)
        return claim_next(
            session=session,
            worker_id=self.id,
            lease_seconds=self.lease,
            model=MODEL,
            fits=self._fits,
            default_max_running=self.max_running,
            notified=self.notified,
        ).claimed

    def _claim(self) -> None:
        while len(self.held) < self.p.max_jobs and self.alive():
            started = time.monotonic()
            record = self._claim_once()
            took = time.monotonic() - started
            with self.lock:
                self.log.claims.append((started, took, record is not None))
                if record is not None and self.killed.is_set():  # claimed as it was killed
                    self.log.holds.append(
                        [
                            record.id,
                            record.tenant_id,
                            self.id,
                            started,
                            started,
                            "killed",
                            record.attempts,
                        ]
                    )
                    next(k for k in self.log.kills if k[0] == self.id)[2].append(record.id)
            if record is None or self.killed.is_set():
                return
            self._start(record, started)

    def _start(self, record: JobRecord, claimed_at: float) -> None:
        """The worker's start transaction: where the job resumes (its last checkpoint)."""
        with self.db.transaction() as s:
            done = jobs.last_checkpoint_step(session=s, job_id=record.id)
            jobs.resume_at(session=s, job_id=record.id, step=done)
        hp = hyperparameters(record)
        self.orders += 1
        with self.lock:
            self.log.holds.append(
                [record.id, record.tenant_id, self.id, claimed_at, None, None, record.attempts]
            )
            hold = len(self.log.holds) - 1
        with self._held_lock:
            self.held[record.id] = Held(
                record=record,
                steps=int((record.metadata or {})["fleet_steps"]),
                done=done,
                rows=hp.micro_batch_size,
                width=hp.max_seq_len,
                state_bytes=memory.job_state_bytes(SHAPE, hp),
                order=self.orders,
                lease_ok_until=claimed_at + self.lease,
                hold=hold,
            )

    # -- stepping ----------------------------------------------------------------------

    def _margin(self) -> float:
        return min(0.5 * self.lease, 1.5 * self.last_step_wall + 0.1 * self.lease)

    def _step(self) -> bool:
        now = time.monotonic()
        usable = [
            h for h in self.held.values() if not h.lost and h.lease_ok_until - now > self._margin()
        ]
        if not usable:
            return False
        names = compose_step(
            [
                Candidate(h.record.id, h.record.tenant_id, h.rows, h.width, h.last_served, h.order)
                for h in usable
            ],
            token_budget=self.token_budget,
            memory_free=BUDGET,
            activation=lambda c, w: 0,
        )
        seconds = step_seconds(len(names), self.p.scale, self.rng)
        if self.killed.wait(seconds):
            return True
        t1 = time.monotonic()
        self.last_step_wall = t1 - now
        self.n_steps += 1
        with self.lock:
            self.log.steps.extend((name, self.id, now, t1) for name in names)
        for name in names:
            h = self.held.get(name)
            if h is None or not self.alive():
                continue
            h.done += 1
            h.last_served = self.n_steps
            if h.done >= h.steps:
                self._finish(h)
            elif h.done % self.p.checkpoint_every == 0:
                step = h.done
                if not self._leased(
                    h,
                    lambda s, h=h, step=step: jobs.add_checkpoint(
                        session=s, job_id=h.record.id, step=step, path=f"/sim/{h.record.id}/{step}"
                    ),
                ):
                    self._end(h, "lost")
        return True

    def _finish(self, h: Held) -> None:
        ok = self._leased(
            h,
            lambda s: jobs.release_job(
                session=s, job_id=h.record.id, worker_id=self.id, status=JobStatus.SUCCEEDED
            ),
        )
        self._end(h, "succeeded" if ok else "lost")
        if ok and self.killed.is_set():  # committed as it was killed: nothing to take over
            with self.lock:
                next(k for k in self.log.kills if k[0] == self.id)[2].remove(h.record.id)


# --- a run --------------------------------------------------------------------------------


def _process(
    url: str, wids: list[str], kills: dict[str, float], p: Params, stop: Any, out: str | None
) -> Log:
    """Run these workers (threads) until `stop`; kill each in `kills` at its time and start
    its replacement RESTART_S (scaled) later. Writes the log to `out` (a child process)."""
    log, lock = Log(), threading.Lock()
    # a worker's loop and heartbeat thread take turns on this process's share of the
    # connections (Postgres' default max_connections is 100, shared with everything else)
    db = Database.connect(url, pool_size=max(2, p.connections), max_overflow=0, pool_timeout=120)
    with db.transaction() as s:  # the mappers and a connection ready before the clock runs
        s.execute(select(m.Job.id).limit(1)).all()
    workers = {w: SimWorker(w, db, p, log, lock, stop) for w in wids}
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers.values()]
    for t in threads:
        t.start()
    pending = sorted((t, w) for w, t in kills.items())
    restarts: list[tuple[float, str]] = []
    while not stop.is_set():
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, w = pending.pop(0)
            workers[w].kill()
            restarts.append((now + RESTART_S * p.scale, f"{w}-restarted"))
        while restarts and restarts[0][0] <= now:
            _, w = restarts.pop(0)
            workers[w] = SimWorker(w, db, p, log, lock, stop)
            threads.append(threading.Thread(target=workers[w].run, daemon=True))
            threads[-1].start()
        stop.wait(0.02)
    for t in threads:
        t.join(timeout=10)
    db.dispose()
    if out is not None:
        Path(out).write_text(json.dumps(asdict(log)))
    return log


# What the run's sessions are doing ("idle in transaction": the worker holds a transaction
# open while its Python works; "active: Lock/...": waiting for a lock)
BACKENDS = text(
    "SELECT state || coalesce(': ' || wait_event_type || '/' || wait_event, ''), count(*) "
    "FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid() "
    "AND state <> 'idle' GROUP BY 1"
)


def _xact_commit(db: Database, name: str) -> int:
    with db.engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        return int(
            conn.execute(
                text("SELECT xact_commit FROM pg_stat_database WHERE datname = :n"), {"n": name}
            ).scalar_one()
        )


@dataclass
class Outcome:
    params: Params
    wall: float
    log: Log
    t0: float
    steps: dict[str, int]
    statuses: dict[str, int]
    failures: list[str]  # the jobs that did not succeed, and why
    xact_commits: int
    timed_out: bool
    backends: dict[str, int]  # samples of the sessions' "state: wait event", every 0.25 s


def run_fleet(p: Params, url: str | None = None) -> Outcome:
    """One run on a fresh database (dropped afterwards)."""
    with fresh_postgres_database(url) as db_url:
        migrate.upgrade(db_url)
        admin = Database.connect(db_url, pool_size=2, max_overflow=0)
        steps = seed_database(admin, p)
        name = admin.engine.url.database or ""
        wids = [f"fleet-w{i:03d}" for i in range(p.workers)]
        rng = random.Random(p.seed)
        expected = _expected_seconds(p, steps)
        victims = rng.sample(wids, max(1, round(p.kill * p.workers))) if p.kill > 0 else []
        commits0 = _xact_commit(admin, name)
        t0 = time.monotonic()
        kills = {w: t0 + p.kill_at * expected * rng.uniform(0.8, 1.2) for w in victims}
        groups = [wids[i :: p.processes] for i in range(min(p.processes, p.workers))]
        logs: list[Log] = []
        if len(groups) == 1:
            stop: Any = threading.Event()
            runner = threading.Thread(
                target=lambda: logs.append(_process(db_url, groups[0], kills, p, stop, None))
            )
            runner.start()
            procs: list[Any] = []
        else:
            ctx = mp.get_context("fork")
            stop = ctx.Event()
            outs = [f"/tmp/fleet-{os.getpid()}-{i}.json" for i in range(len(groups))]
            procs = [
                ctx.Process(
                    target=_process,
                    args=(db_url, g, {w: kills[w] for w in g if w in kills}, p, stop, o),
                )
                for g, o in zip(groups, outs, strict=True)
            ]
            for pr in procs:
                pr.start()
        timed_out = False
        backends: dict[str, int] = defaultdict(int)  # sampled (state, wait) of the run's sessions
        while True:
            time.sleep(0.25)
            with admin.transaction() as s:
                left = s.scalar(
                    select(func.count()).where(
                        m.Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])
                    )
                )
                for state, n in s.execute(BACKENDS, {"db": name}):
                    backends[state] += n
            if not left:
                break
            if time.monotonic() - t0 > p.timeout:
                timed_out = True
                break
        wall = time.monotonic() - t0
        stop.set()
        if procs:
            for pr in procs:
                pr.join()
            logs = [_read_log(o) for o in outs]
        else:
            runner.join()
        time.sleep(0.6)  # the stats collector's last flush (PGSTAT_MIN_INTERVAL 1 s)
        commits = _xact_commit(admin, name) - commits0
        with admin.transaction() as s:
            statuses = dict(
                s.execute(select(m.Job.status, func.count()).group_by(m.Job.status)).all()
            )
            failures = [
                f"{job_id}: {error}"
                for job_id, error in s.execute(
                    select(m.Job.id, m.Job.error).where(m.Job.status != JobStatus.SUCCEEDED.value)
                )
            ]
        admin.dispose()
    return Outcome(
        p, wall, _merge(logs), t0, steps, statuses, failures, commits, timed_out, dict(backends)
    )


def _read_log(path: str) -> Log:
    data = json.loads(Path(path).read_text())
    Path(path).unlink()
    return Log(**data)


def _merge(logs: list[Log]) -> Log:
    out = Log()
    for log in logs:
        out.claims += log.claims
        out.holds += log.holds
        out.steps += log.steps
        out.expired += log.expired
        out.kills += log.kills
        out.errors += log.errors
    return out


def _expected_seconds(p: Params, steps: dict[str, int]) -> float:
    """The run's length if every slot were busy all the time (for the kill time)."""
    per_step = step_seconds(p.max_jobs, p.scale, random.Random(0)) / 1.0
    return sum(steps.values()) * per_step / (p.workers * p.max_jobs) + 1.0


# --- the claim's statements, explained --------------------------------------------------


def explain_claim(p: Params, running: int = 500) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of every statement one `claim_next` runs, on a fresh
    database holding `p.jobs` queued jobs of which `running` were claimed first (in a
    transaction rolled back after: it locks what the claim locks)."""
    out = []
    with fresh_postgres_database() as db_url:
        migrate.upgrade(db_url)
        db = Database.connect(db_url, pool_size=2, max_overflow=0)
        seed_database(db, p)
        worker = SimWorker("explain", db, p, Log(), threading.Lock(), threading.Event())
        for _ in range(running):
            worker._claim_once()
        walls, cpus = [], []
        for _ in range(30):  # the same claim, rolled back each time
            with db.transaction() as s:
                wall, cpu = time.perf_counter(), time.process_time()
                worker._claim_once(s)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
                s.rollback()
        statements: list[tuple[str, Any]] = []

        def capture(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: Any) -> None:
            statements.append((sql, params))

        event.listen(db.engine, "before_cursor_execute", capture)
        with db.transaction() as s:
            worker._claim_once(s)
            s.rollback()
        event.remove(db.engine, "before_cursor_execute", capture)
        out.append(
            f"claim_next with {p.jobs - running} queued, {running} running, median of 30: "
            f"{statistics.median(walls) * 1000:.1f} ms wall, "
            f"{statistics.median(cpus) * 1000:.1f} ms of this process's CPU; "
            f"{len(statements)} statements"
        )
        for sql, params in statements:
            if not sql.lstrip().upper().startswith(("SELECT", "UPDATE", "INSERT")):
                continue
            with db.engine.connect() as conn:
                cur = conn.connection.driver_connection.cursor()
                cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
                plan = "\n".join(r[0] for r in cur.fetchall())
                conn.rollback()
            out.append(f"\n{' '.join(sql.split())}\n{plan}")
        db.dispose()
    return "\n".join(out)


# --- the report ---------------------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def _water_fill(capacity: float, demand: np.ndarray) -> np.ndarray:
    """Max-min fair split of `capacity` among demands (each gets at most its demand)."""
    alloc = np.zeros_like(demand, dtype=float)
    active = demand > 0
    left = capacity
    while left > 1e-9 and active.any():
        share = left / active.sum()
        room = demand - alloc
        take = np.where(active, np.minimum(room, share), 0.0)
        alloc += take
        left -= take.sum()
        active &= demand - alloc > 1e-9
    return alloc


WINDOW_STEPS = 20  # fairness windows: as long as 20 one-job steps


def fairness(o: Outcome) -> float:
    """Jain's index over tenants of x = (slot time the tenant held) / (its max-min fair
    share of the slots in use), both summed over the windows (WINDOW_STEPS steps long) in
    which it had a job waiting. A tenant's demand at a time is its unfinished jobs, capped
    at max_running_jobs; a job waits while it is unfinished and held by no live worker."""
    holds = o.log.holds
    if not holds:
        return float("nan")
    window = WINDOW_STEPS * MEASURED_STEP_S[0][1] * o.params.scale
    per = 8  # samples a window
    windows = max(1, math.ceil(o.wall / window))
    samples = windows * per
    tenants = sorted({h[1] for h in holds})
    index = {t: i for i, t in enumerate(tenants)}
    end = o.t0 + o.wall
    mid = o.t0 + (np.arange(samples) + 0.5) * (window / per)
    n = len(tenants)
    running = np.zeros((n, samples))
    finished: dict[str, float] = {}
    job_tenant: dict[str, str] = {}
    for job, tenant, _, t_claim, t_end, how, _ in holds:
        b = t_end if t_end is not None else end
        running[index[tenant]] += (mid >= t_claim) & (mid < b)
        job_tenant[job] = tenant
        if how == "succeeded":
            finished[job] = b
    unfinished = np.zeros((n, samples))
    for job, tenant in job_tenant.items():
        unfinished[index[tenant]] += mid < finished.get(job, math.inf)
    waiting = (unfinished - running > 0.5).reshape(n, windows, per).any(axis=2)
    demand = np.minimum(unfinished, get_settings().max_running_jobs)
    fair = np.zeros((n, samples))
    for k in range(samples):
        fair[:, k] = _water_fill(running[:, k].sum(), demand[:, k])
    got = (running.reshape(n, windows, per).sum(axis=2) * waiting).sum(axis=1)
    due = (fair.reshape(n, windows, per).sum(axis=2) * waiting).sum(axis=1)
    keep = due > 0
    x = got[keep] / due[keep]
    return float(x.sum() ** 2 / (len(x) * (x**2).sum())) if len(x) else float("nan")


def summary(o: Outcome) -> dict[str, Any]:
    p, log = o.params, o.log
    took = [s * 1000 for _, s, ok in log.claims if ok]
    first: dict[str, float] = {}
    tenant_of: dict[str, str] = {}
    for job, tenant, _, t_claim, _, _, _ in log.holds:
        first[job] = min(first.get(job, math.inf), t_claim)
        tenant_of[job] = tenant
    waits: dict[str, list[float]] = defaultdict(list)
    for job, t in first.items():
        waits[tenant_of[job]].append(t - o.t0)
    tenant_wait = [statistics.median(v) for v in waits.values()]
    first_wait = [min(v) for v in waits.values()]
    queue_end = max(first.values(), default=o.t0)
    span = max(queue_end - o.t0, 1e-9)
    busy = sum(
        max(0.0, min(t_end if t_end is not None else queue_end, queue_end) - t_claim)
        for _, _, _, t_claim, t_end, _, _ in log.holds
    )
    takeovers = sum(1 for h in log.holds if h[6] > 1)
    killed_jobs = {j for _, _, held in log.kills for j in held}
    return {
        "workers": p.workers,
        "slots": p.workers * p.max_jobs,
        "sim_s": round(o.wall, 1),
        "succeeded": o.statuses.get(JobStatus.SUCCEEDED.value, 0),
        "jobs": p.jobs,
        "claims": len(took),
        "claim_p50_ms": round(_pct(took, 50), 1),
        "claim_p99_ms": round(_pct(took, 99), 1),
        "empty_claims": sum(1 for _, _, ok in log.claims if not ok),
        "tenant_wait_p50_s": round(_pct(tenant_wait, 50), 2),
        "tenant_wait_p99_s": round(_pct(tenant_wait, 99), 2),
        "first_job_wait_p99_s": round(_pct(first_wait, 99), 2),
        "jain": round(fairness(o), 3),
        "utilisation": round(busy / (p.workers * p.max_jobs * span), 3),
        "db_tx_per_s": round(o.xact_commits / o.wall, 0),
        "killed_workers": len(log.kills),
        "killed_jobs": len(killed_jobs),
        "lease_expiries": log.expired,
        "takeovers": takeovers,
        "errors": len(log.errors),
        "busy_sessions": {  # mean sessions in each state over the samples
            k: round(v / max(1, round(o.wall / 0.25)), 2)
            for k, v in sorted(o.backends.items(), key=lambda kv: -kv[1])[:6]
        },
        "timed_out": o.timed_out,
    }


COLUMNS = [
    ("workers", "workers"),
    ("slots", "slots"),
    ("sim_s", "sim s"),
    ("succeeded", "done"),
    ("claim_p50_ms", "claim p50 ms"),
    ("claim_p99_ms", "claim p99 ms"),
    ("empty_claims", "empty claims"),
    ("tenant_wait_p50_s", "tenant wait p50 s"),
    ("tenant_wait_p99_s", "tenant wait p99 s"),
    ("first_job_wait_p99_s", "1st-job wait p99 s"),
    ("jain", "Jain"),
    ("utilisation", "slot util"),
    ("db_tx_per_s", "DB tx/s"),
    ("killed_jobs", "jobs on killed workers"),
    ("lease_expiries", "lease expiries"),
    ("takeovers", "takeovers"),
]


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    rule = "| " + " | ".join("---:" for _ in COLUMNS) + " |"
    body = ["| " + " | ".join(str(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = Params()
    ap.add_argument("--tenants", type=int, default=d.tenants)
    ap.add_argument("--jobs", type=int, default=d.jobs)
    ap.add_argument("--workers", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--max-jobs", type=int, default=d.max_jobs, help="worker_max_jobs")
    ap.add_argument("--scale", type=float, default=d.scale, help="simulated s per real s")
    ap.add_argument("--steps", type=float, default=d.steps, help="median steps per job")
    ap.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    ap.add_argument("--kill", type=float, default=d.kill, help="share of workers killed")
    ap.add_argument("--processes", type=int, default=d.processes)
    ap.add_argument("--connections", type=int, default=d.connections, help="per process")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--timeout", type=float, default=d.timeout, help="stop a row (sim s)")
    ap.add_argument("--quick", action="store_true", help="100 tenants, 1,000 jobs, 8 and 32")
    ap.add_argument("--out", type=Path, help="write the table (markdown) and JSON beside it")
    ap.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE one claim, no run")
    a = ap.parse_args(argv)
    if a.explain:
        print(explain_claim(Params(tenants=a.tenants, jobs=a.jobs, seed=a.seed)))
        return 0
    if a.quick:
        a.tenants, a.jobs, a.workers = 100, 1000, [8, 32]
    rows = []
    for w in a.workers:
        p = Params(
            tenants=a.tenants,
            jobs=a.jobs,
            workers=w,
            max_jobs=a.max_jobs,
            scale=a.scale,
            steps=a.steps,
            checkpoint_every=a.checkpoint_every,
            kill=a.kill,
            processes=a.processes,
            connections=a.connections,
            seed=a.seed,
            timeout=a.timeout,
        )
        started = time.monotonic()
        o = run_fleet(p)
        row = summary(o)
        row["host_s"] = round(time.monotonic() - started, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        for e in o.log.errors[:5]:
            print("error:", e, file=sys.stderr)
    table = markdown(rows)
    print(table)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(table + "\n")
        a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
