"""Process-level faults against real `mixloom api` and `mixloom worker` processes: kill -9 of
a worker at chosen steps, a PostgreSQL restart, a Redis outage, the data directory made
read-only or full. Each scenario trains a few tenants' jobs through the fault and returns a
`Report`: what the tenants saw (statuses, warning and error events, API errors), and what
was lost (a job that did not succeed, or whose adapter differs from an uninterrupted
`mixloom train` run of the same jobs).

Every service a scenario breaks is its own: a PostgreSQL cluster on a free port (initdb and
pg_ctl, run as the `postgres` OS user when this is root) and a redis-server on a free port,
both under a temporary folder and stopped at the end; the machine's own services are never
touched. tests/scheduler/test_faults_services.py asserts on the reports and
bench/reliability.py prints them as a table; both use this module, which lives beside the
tests' stack (helpers.py) because it is built on it.
"""

from __future__ import annotations

import errno
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from helpers import (
    REPO,
    adapter_tensors,
    arithmetic_rows,
    free_port,
    train_reference,
    write_jsonl,
)
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from tiny import save_tiny_base

from mixloom.clients import Client
from mixloom.storage import migrate, tenants
from mixloom.storage import models as m
from mixloom.storage.db import Database

FINISHED = ("succeeded", "failed", "cancelled")
# status changes every job goes through, and a tenant's own resume; the others (paused,
# queued again, failed) are what a fault shows a tenant, at whatever level
QUIET_STATUSES = ("Job created", "Job started", "Job running", "Job succeeded", "Job resumed")
LOG = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# -- services of our own ---------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries on this machine (Debian's layout), or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def mount_problem() -> str | None:
    """None if this process may mount a tmpfs (the data directory scenario), else why not."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a tmpfs for the data directory needs root and mount(8)"
    return None


def services_problem() -> str | None:
    """None if this machine can start its own PostgreSQL and Redis, else what is missing."""
    if postgres_bin() is None:
        return "PostgreSQL's server binaries (initdb, pg_ctl) are not installed"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "runuser is needed to run PostgreSQL as the postgres user (this is root)"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    return None


class OwnPostgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port>, trust authentication,
    fsync off. As root it runs as the `postgres` OS user (postgres refuses root)."""

    def __init__(self) -> None:
        bindir = postgres_bin()
        assert bindir is not None, services_problem()
        self.bin = bindir
        # a folder of its own directly in /tmp: the postgres user cannot pass through the
        # caller's (pytest's tmp_path is 0700, and pytest sets it back to 0700 at each start)
        self.root = Path(tempfile.mkdtemp(prefix="mixloom-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.root / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args)}: exit {done.returncode}: {done.stdout}{done.stderr}\n"
                f"server log (end):\n{tail}"
            )

    def init(self) -> OwnPostgres:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                "max_connections = 60\nshared_buffers = 16MB\n"
            )
        self.start()
        return self

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-m",
            mode,
            "-w",
            "restart",
        )

    def close(self) -> None:
        with suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class OwnRedis:
    """A redis-server on 127.0.0.1:<free port>, no persistence: a restart starts empty."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="redis-", dir=root))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OwnRedis:
        import redis

        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        log = open(self.dir / "log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(["redis-server", *args], cwd=self.dir, stdout=log, stderr=log)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def services(tmp: Path) -> Iterator[tuple[OwnPostgres, OwnRedis]]:
    """Our own PostgreSQL and Redis for one scenario, stopped and removed afterwards."""
    pg = OwnPostgres()
    rd = OwnRedis(tmp)
    try:
        pg.init()
        rd.start()
        yield pg, rd
    finally:
        rd.close()
        pg.close()


@contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """`path` as a tmpfs of its own (root only), unmounted afterwards whatever happened."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], check=False)
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str, timeout: float = 30) -> None:
    """Remount `path` read-only ("ro") or writable ("rw"). Read-only fails with "busy"
    while a file there is open for writing (a checkpoint being written): try again."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            ["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, text=True
        )
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"mount -o remount,{mode} {path}: {done.stderr.strip()}")
        time.sleep(0.02)


def fill(path: Path) -> Path:
    """Write zeros into `path` until its file system is full; returns the file written."""
    big = path / "filler.bin"
    chunk = b"\0" * (1 << 20)
    with open(big, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return big


# -- the workload ----------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    name: str
    tenant: str
    seed: int
    method: dict[str, Any]

    def train_config(self) -> dict[str, Any]:
        """The job as `mixloom train` takes it (the uninterrupted reference)."""
        return {"name": self.name, "seed": self.seed, "method": self.method}


def workload(steps: int, checkpoint_every: int) -> tuple[list[dict[str, str]], list[JobSpec]]:
    """Three tenants' jobs of `steps` optimizer steps each (batch 2 of 2 * steps rows):
    two LoRA of different ranks and one MixLoRA, all with dropout (the RNG must resume)."""
    hp = dict(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        max_seq_len=32,
        batch_size=2,
        checkpoint_every=checkpoint_every,
    )
    specs = [
        JobSpec("acme-lora", "acme", 3, {"type": "lora", "lora": {"hyperparameters": hp}}),
        JobSpec(
            "globex-mixlora",
            "globex",
            4,
            {
                "type": "mixlora",
                "mixlora": {"hyperparameters": {**hp, "num_experts": 4, "top_k": 2}},
            },
        ),
        JobSpec(
            "initech-lora8",
            "initech",
            5,
            {"type": "lora", "lora": {"hyperparameters": {**hp, "r": 8, "lora_alpha": 16}}},
        ),
    ]
    return arithmetic_rows(2 * steps, seed=5), specs


@dataclass
class Submitted:
    spec: JobSpec
    client: Client
    job_id: str


# -- the processes ---------------------------------------------------------------------


class Cluster:
    """One API process and any number of worker processes on one database and Redis."""

    def __init__(
        self,
        tmp: Path,
        *,
        database_url: str,
        redis_url: str | None,
        data_dir: Path | None = None,
        lease_seconds: float = 2.0,
        log: LOG = _quiet,
    ) -> None:
        self.tmp = tmp
        self.base = save_tiny_base(tmp / "tiny-base")
        self.data_dir = data_dir or tmp / "data"
        self.database_url = database_url
        self.redis_url = redis_url
        self.lease_seconds = lease_seconds
        self.log = log
        migrate.upgrade(database_url)
        self.db = Database.connect(database_url)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: dict[str, float] = {}  # worker -> time.time() of its SIGKILL
        self.url = ""
        self.model = ""
        self._clients: list[Client] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "MIXLOOM_DATA_DIR": str(self.data_dir),
                "MIXLOOM_DATABASE_URL": self.database_url,
                "MIXLOOM_BASE_MODEL": str(self.base),
                "MIXLOOM_DEVICE": "cpu",
                "MIXLOOM_KERNEL_BACKEND": "torch",
                "OMP_NUM_THREADS": "1",  # tiny models: threads only contend
            }
        )
        env.pop("MIXLOOM_REDIS_URL", None)
        if self.redis_url:
            env["MIXLOOM_REDIS_URL"] = self.redis_url
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "mixloom.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.procs[name] = proc
        return proc

    def spawn_api(self) -> str:
        port = free_port()
        self._spawn(
            "api",
            ["api", "--no-migrate", "--port", str(port), "--log-level", "warning"],
            self.env(),
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert self.procs["api"].poll() is None, self.log_text("api")
            with suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self.url
            assert time.monotonic() < deadline, "mixloom api did not start"
            time.sleep(0.1)

    def spawn_worker(self, name: str) -> subprocess.Popen[bytes]:
        env = self.env()
        env.update(
            {
                "MIXLOOM_WORKER_ID": name,
                "MIXLOOM_WORKER_LEASE_SECONDS": str(self.lease_seconds),
                "MIXLOOM_WORKER_POLL_SECONDS": "0.2",
                "MIXLOOM_WORKER_METRICS_INTERVAL_SECONDS": "0",  # every step's metrics
            }
        )
        return self._spawn(name, ["worker", "--no-migrate"], env)

    def workers(self) -> dict[str, subprocess.Popen[bytes]]:
        """Worker processes still alive."""
        return {n: p for n, p in self.procs.items() if n != "api" and p.poll() is None}

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(timeout=30)
        self.killed[name] = time.time()

    def log_text(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_lines(self, name: str) -> int:
        return self.log_text(name).count("\n")

    def client(self, tenant: str, **options: Any) -> Client:
        with self.db.transaction() as session:
            t = tenants.create_tenant(session=session, name=tenant)
            _, key = tenants.create_api_key(session=session, tenant_id=t.id)
        client = Client(self.url, api_key=key, timeout=30, **options)
        self._clients.append(client)
        return client

    def submit(self, rows: list[dict[str, str]], specs: list[JobSpec]) -> list[Submitted]:
        data = write_jsonl(self.tmp / "train.jsonl", rows)
        out = []
        for spec in specs:
            client = self.client(spec.tenant)
            self.model = self.model or client.list_models()[0].id
            f = client.upload_file(data)
            job = client.create_job(
                training_file=f.id, model=self.model, method=spec.method, seed=spec.seed
            )
            out.append(Submitted(spec, client, job.id))
        return out

    # -- what the database says (None while it is down) --

    def progress(self, ids: list[str]) -> dict[str, int] | None:
        """Each job's highest step with a metrics row."""
        try:
            with self.db.transaction() as s:
                rows = s.execute(
                    select(m.JobMetric.job_id, func.max(m.JobMetric.step))
                    .where(m.JobMetric.job_id.in_(ids))
                    .group_by(m.JobMetric.job_id)
                ).all()
        except DBAPIError:
            return None
        got = {job_id: int(step) for job_id, step in rows}
        return {i: got.get(i, 0) for i in ids}

    def jobs(self, ids: list[str]) -> dict[str, tuple[str, str | None]] | None:
        """Each job's (status, worker_id)."""
        try:
            with self.db.transaction() as s:
                rows = s.execute(
                    select(m.Job.id, m.Job.status, m.Job.worker_id).where(m.Job.id.in_(ids))
                ).all()
        except DBAPIError:
            return None
        return {i: (st, w) for i, st, w in rows}

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for client in self._clients:
            client.close()
        self.db.dispose()


# -- waiting, with the workers supervised ----------------------------------------------


class Supervisor:
    """Keeps `want` workers alive: a worker that exits by itself (not one we killed) is
    counted as a crash and replaced, as systemd or Kubernetes would, at most `max_restarts`
    times. Tenants' paused jobs are resumed when `resume_paused` (as a tenant would)."""

    def __init__(self, cluster: Cluster, prefix: str, want: int = 1, max_restarts: int = 20):
        self.c = cluster
        self.prefix = prefix
        self.want = want
        self.max_restarts = max_restarts
        self.spawned = 0
        self.crashes: list[tuple[str, int | None, str]] = []  # (worker, rc, last log line)
        self.resumed = 0
        self.resume_paused = True
        self._looked = -1.0  # monotonic time paused jobs were last looked for

    def spawn(self) -> str:
        self.spawned += 1
        name = f"{self.prefix}{self.spawned}"
        self.c.spawn_worker(name)
        return name

    def fill(self) -> None:
        while len(self.c.workers()) < self.want:
            self.spawn()

    def check(self, jobs: list[Submitted]) -> None:
        for name, proc in list(self.c.procs.items()):
            if name == "api" or name in self.c.killed or proc.poll() is None:
                continue
            if any(n == name for n, _, _ in self.crashes):
                continue
            lines = [x for x in self.c.log_text(name).splitlines() if x.strip()]
            last = lines[-1][:160] if lines else ""
            self.crashes.append((name, proc.returncode, last))
            self.c.log(f"  worker {name} exited by itself (rc {proc.returncode}): {last}")
            assert len(self.crashes) <= self.max_restarts, "workers keep crashing"
        self.fill()
        if self.resume_paused and time.monotonic() - self._looked > 0.5:
            self._looked = time.monotonic()
            states = self.c.jobs([j.job_id for j in jobs]) or {}
            for j in jobs:
                if states.get(j.job_id, ("", None))[0] == "paused":
                    with suppress(Exception):
                        j.client.resume_job(j.job_id)
                        self.resumed += 1
                        self.c.log(f"  resumed paused job {j.spec.name}")

    def wait(self, jobs: list[Submitted], pred: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            self.check(jobs)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"not reached in {timeout:.0f} s: {self.c.jobs([j.job_id for j in jobs])}"
                )
            time.sleep(0.02)

    def reach(self, jobs: list[Submitted], step: int, timeout: float) -> int:
        """Wait until some job has a metrics row at `step` or later; returns the highest."""
        ids = [j.job_id for j in jobs]
        seen = [0]

        def reached() -> bool:
            progress = self.c.progress(ids)
            if progress:
                seen[0] = max(progress.values())
            return seen[0] >= step

        self.wait(jobs, reached, timeout)
        return seen[0]

    def finish(self, jobs: list[Submitted], timeout: float) -> None:
        ids = [j.job_id for j in jobs]

        def finished() -> bool:
            states = self.c.jobs(ids)
            return states is not None and all(st in FINISHED for st, _ in states.values())

        self.wait(jobs, finished, timeout)


# -- API polling, as a tenant's dashboard would -----------------------------------------


class Poller:
    """GETs each job every `every` s with no client retries, counting what came back."""

    def __init__(self, jobs: list[Submitted], every: float = 0.2) -> None:
        self.jobs = jobs
        self.every = every
        self.outcomes: Counter[str] = Counter()
        self.last_ok = 0.0
        self.last_error = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._clients = [
            Client(j.client.base_url, j.client.api_key, timeout=10, max_retries=0) for j in jobs
        ]

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for c in self._clients:
            c.close()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for c, j in zip(self._clients, self.jobs, strict=True):
                try:
                    c.get_job(j.job_id)
                    self.outcomes["200"] += 1
                    self.last_ok = time.time()
                except Exception as exc:
                    status = getattr(exc, "status_code", 0)
                    code = getattr(exc, "code", None)
                    key = f"{status} {code}" if status else type(exc).__name__
                    self.outcomes[key] += 1
                    self.last_error = time.time()

    @property
    def errors(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k != "200")

    def recovered_after(self, since: float, timeout: float = 60) -> float:
        """Seconds from `since` until a request succeeded after it."""
        deadline = time.monotonic() + timeout
        while self.last_ok <= since:
            if time.monotonic() > deadline:
                raise TimeoutError("the API did not recover")
            time.sleep(0.05)
        return self.last_ok - since


class StreamReader:
    """Each job's SSE stream, read from its start in a thread; reconnects are the client's."""

    def __init__(self, jobs: list[Submitted]) -> None:
        self.got: dict[str, list[int]] = {j.job_id: [] for j in jobs}
        self.ended: dict[str, bool] = {j.job_id: False for j in jobs}
        self.errors: dict[str, str] = {}
        self._clients = [
            Client(j.client.base_url, j.client.api_key, timeout=30, max_retries=20) for j in jobs
        ]
        self._threads = [
            threading.Thread(target=self._read, args=(c, j.job_id), daemon=True)
            for c, j in zip(self._clients, jobs, strict=True)
        ]
        for t in self._threads:
            t.start()

    def _read(self, client: Client, job_id: str) -> None:
        try:
            for message in client.stream(job_id):
                if message.event == "end":
                    self.ended[job_id] = True
                    return
                if message.id is not None:
                    self.got[job_id].append(message.id)
        except Exception as exc:
            self.errors[job_id] = f"{type(exc).__name__}: {exc}"[:200]

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        for c in self._clients:
            c.close()


# -- what the tenants saw, and what was lost --------------------------------------------


@dataclass
class Report:
    fault: str
    runs: int = 1  # faults injected
    jobs: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)  # "level: message shape" -> count
    api: Counter[str] = field(default_factory=Counter)  # polled GETs by outcome
    lost: list[str] = field(default_factory=list)  # job names, with why
    metrics_duplicates: int = 0  # steps with more than one metrics row
    metrics_missing: int = 0  # steps with none
    overlaps: int = 0  # a job's steps recorded by two workers interleaved
    crashes: list[str] = field(default_factory=list)  # workers that exited by themselves
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def seen(self) -> str:
        parts = [" ".join(f"{n} {s}" for s, n in sorted(self.statuses.items()))]
        if self.api:
            errors = {k: n for k, n in self.api.items() if k != "200"}
            parts.append(
                f"API: {sum(self.api.values())} GETs, {sum(errors.values())} errors"
                + (
                    f" ({', '.join(f'{k} x{n}' for k, n in sorted(errors.items()))})"
                    if errors
                    else ""
                )
            )
        if self.crashes:
            parts.append(f"workers exited by themselves x{len(self.crashes)}")
        for shape, n in self.events.most_common(4):
            parts.append(f"{n}x '{shape}'")
        if len(self.events) > 4:
            parts.append(f"+{len(self.events) - 4} other event kinds")
        return "; ".join(parts)

    def events_detail(self) -> list[str]:
        return [f"event {n}x '{shape}'" for shape, n in self.events.most_common()]


def _shape(message: str) -> str:
    """An event message with its numbers and ids blanked, cut short: a kind to count."""
    text = re.sub(r"\S*\d\S*", "#", message)
    return text if len(text) <= 70 else text[:67] + "..."


def audit(report: Report, cluster: Cluster, jobs: list[Submitted], steps: int) -> None:
    """Fill `report` from the database and the API, and compare every adapter with an
    uninterrupted `mixloom train` run of the same jobs."""
    report.jobs = len(jobs)
    reference = train_reference(
        cluster.tmp,
        cluster.base,
        cluster.tmp / "train.jsonl",
        [j.spec.train_config() for j in jobs],
    )
    for j in jobs:
        job = j.client.get_job(j.job_id)
        report.statuses[job.status] += 1
        for e in j.client.iter_events(j.job_id, page_size=100):
            if e.level in ("warning", "error") or (
                e.type == "status" and not e.message.startswith(QUIET_STATUSES)
            ):
                report.events[f"{e.level}: {_shape(e.message)}"] += 1
        with cluster.db.transaction() as s:
            rows = s.execute(
                select(m.JobMetric.step, m.JobMetric.values, m.JobMetric.created_at)
                .where(m.JobMetric.job_id == j.job_id)
                .order_by(m.JobMetric.seq)
            ).all()
        per_step = Counter(step for step, _, _ in rows)
        dupes = sorted(s for s, n in per_step.items() if n > 1)
        missing = sorted(set(range(1, steps + 1)) - set(per_step))
        report.metrics_duplicates += sum(n - 1 for n in per_step.values())
        report.metrics_missing += len(missing)
        if dupes or missing:
            report.notes.append(
                f"metrics of {j.spec.name}: steps {dupes} recorded more than once, "
                f"steps {missing} never"
            )
        # a worker's run of steps never resumes after another's began, and a killed worker's
        # successor records its first step after the kill
        order = [v.get("worker_id") for _, v, _ in rows]
        starts = [i for i in range(len(order)) if i == 0 or order[i - 1] != order[i]]
        segments = [order[i] for i in starts]
        report.overlaps += len(segments) - len(set(segments))
        for prev, i in zip(starts, starts[1:], strict=False):
            killed = cluster.killed.get(str(order[prev]))
            if killed is not None and rows[i][2].timestamp() < killed:
                report.overlaps += 1
        if job.status != "succeeded":
            report.lost.append(f"{j.spec.name}: {job.status} ({job.error})")
            continue
        archive = j.client.download_adapter(j.job_id, cluster.tmp / f"{j.spec.name}.zip")
        got = adapter_tensors(archive, cluster.tmp / f"unzipped-{j.spec.name}")
        want = reference[j.spec.name]
        worst = max((float((got[k] - want[k]).abs().max()) for k in want if k in got), default=0.0)
        if set(got) != set(want) or worst > 1e-5:
            report.lost.append(f"{j.spec.name}: adapter differs (max |diff| {worst:.2e})")


def spaced_steps(rng: random.Random, n: int, lo: int, hi: int, gap: int) -> list[int]:
    """`n` sorted random steps in [lo, hi], consecutive ones at least `gap` apart."""
    room = hi - lo - (n - 1) * (gap - 1)
    if n > room + 1 or room < 0:
        raise ValueError(
            f"{n} kills {gap} steps apart do not fit in steps {lo}..{hi}: raise --steps"
        )
    picks = sorted(rng.sample(range(lo, lo + room + 1), n))
    return [p + i * (gap - 1) for i, p in enumerate(picks)]


@contextmanager
def _scenario(
    tmp: Path, report: Report, **cluster: Any
) -> Iterator[tuple[Cluster, OwnPostgres, OwnRedis]]:
    started = time.monotonic()
    with ExitStack() as stack:
        pg, rd = stack.enter_context(services(tmp))
        c = Cluster(tmp, database_url=pg.url, redis_url=rd.url, **cluster)
        stack.callback(c.close)
        c.spawn_api()
        yield c, pg, rd
    report.seconds = time.monotonic() - started


# -- the scenarios -----------------------------------------------------------------------


def kill9(
    tmp: Path,
    *,
    n: int = 20,
    seed: int | None = None,
    steps: int | None = None,
    checkpoint_every: int = 2,
    lease_seconds: float = 2.0,
    log: LOG = _quiet,
) -> Report:
    """SIGKILL the worker holding the jobs whenever the metrics table reaches one of `n`
    random steps; a standby worker takes the jobs over and a new standby starts each time.
    Kills are at least checkpoint_every + 1 steps apart, so that every worker passes a
    checkpoint before the next kill (else worker_max_crashes would fail the jobs as
    poisoned, which is right for a job that kills its worker, and not this fault)."""
    seed = random.randrange(1 << 30) if seed is None else seed
    gap = checkpoint_every + 1
    steps = steps or max(24, gap * (n + 2) + 4)
    targets = spaced_steps(random.Random(seed), n, 2, steps - 2, gap)
    report = Report("worker kill -9", runs=n)
    report.notes.append(f"seed {seed}, {steps} steps per job, kills at steps {targets}")
    log(f"kill9: seed {seed}, {steps} steps per job, kill at steps {targets}")
    rows, specs = workload(steps, checkpoint_every)
    with _scenario(tmp, report, lease_seconds=lease_seconds, log=log) as (c, _, _):
        jobs = c.submit(rows, specs)
        ids = [j.job_id for j in jobs]
        sup = Supervisor(c, "w", want=2)

        def standby() -> None:
            """One worker trains, one stands by, loaded, to take the jobs over when their
            leases expire. The standby starts once the trainer holds every job: two
            workers started together would share the jobs, and one kill would take both."""
            if not c.workers():
                sup.want = 1  # (the supervisor would start the standby while waiting)
                sup.spawn()

                def held() -> bool:
                    states = c.jobs(ids) or {}
                    return bool(states) and all(
                        st in FINISHED or (st == "running" and w in c.workers())
                        for st, w in states.values()
                    )

                sup.wait(jobs, held, timeout=300)
            sup.want = 2
            sup.fill()

        standby()
        actual = []
        for target in targets:
            at = sup.reach(jobs, target, timeout=300)
            states = c.jobs(ids) or {}
            # (a killed worker's name stays on its jobs until their leases expire)
            holders = {w for st, w in states.values() if st == "running" and w}
            victims = sorted(holders & set(c.workers()))
            for name in victims:
                c.kill(name)
            actual.append(at)
            log(f"  step {at} (target {target}): killed {victims}")
            standby()
        sup.finish(jobs, timeout=600)
        report.notes.append(f"killed when the table showed steps {actual}")
        report.crashes = [
            f"worker {w} exited by itself (rc {rc}): {line}" for w, rc, line in sup.crashes
        ]
        audit(report, c, jobs, steps)
    return report


def postgres_restart(
    tmp: Path,
    *,
    restarts: tuple[tuple[str, float], ...] = (("fast", 0.0), ("immediate", 3.0), ("fast", 5.0)),
    steps: int = 60,
    checkpoint_every: int = 4,
    lease_seconds: float = 3.0,
    log: LOG = _quiet,
) -> Report:
    """Restart our PostgreSQL under the API and a worker at evenly spread steps: each
    (mode, seconds down): `pg_ctl stop -m mode`, down that long, start (0 s: pg_ctl restart)."""
    report = Report("PostgreSQL restart", runs=len(restarts))
    rows, specs = workload(steps, checkpoint_every)
    with _scenario(tmp, report, lease_seconds=lease_seconds, log=log) as (c, pg, _):
        jobs = c.submit(rows, specs)
        sup = Supervisor(c, "w", want=1)
        sup.fill()
        with Poller(jobs) as poller:
            for i, (mode, down) in enumerate(restarts):
                target = steps * (i + 1) // (len(restarts) + 1)
                at = sup.reach(jobs, target, timeout=300)
                t0 = time.time()
                lines = {n: c.log_lines(n) for n in ("api", *c.workers())}
                if down:
                    pg.stop(mode)
                    time.sleep(down)
                    pg.start()
                else:
                    pg.restart(mode)
                back = time.time()
                recovered = poller.recovered_after(back)
                lines = {n: c.log_lines(n) - k for n, k in lines.items()}
                note = (
                    f"step {at}: -m {mode}, down {back - t0:.1f} s; API answered {recovered:.1f} s "
                    f"after the start; log lines printed meanwhile: {lines}"
                )
                report.notes.append(note)
                log("  " + note)
            sup.finish(jobs, timeout=600)
        report.api = poller.outcomes
        report.crashes = [
            f"worker {w} exited by itself (rc {rc}): {line}" for w, rc, line in sup.crashes
        ]
        audit(report, c, jobs, steps)
    return report


def redis_outage(
    tmp: Path,
    *,
    down_seconds: float = 10.0,
    steps: int = 80,
    checkpoint_every: int = 4,
    lease_seconds: float = 3.0,
    log: LOG = _quiet,
) -> Report:
    """SIGKILL our redis-server a quarter into the run, start an empty one on the same port
    `down_seconds` later. Every job's SSE stream is read from its start throughout."""
    report = Report("Redis outage")
    rows, specs = workload(steps, checkpoint_every)
    with _scenario(tmp, report, lease_seconds=lease_seconds, log=log) as (c, _, rd):
        jobs = c.submit(rows, specs)
        sup = Supervisor(c, "w", want=1)
        sup.fill()
        streams = StreamReader(jobs)
        with Poller(jobs) as poller:
            at = sup.reach(jobs, max(2, steps // 4), timeout=300)
            before = {n: c.log_lines(n) for n in ("api", *c.workers())}
            rd.kill()
            time.sleep(down_seconds)
            during = {n: c.log_lines(n) - k for n, k in before.items()}
            rd.start()
            after_start = {n: c.log_lines(n) for n in before}
            sup.finish(jobs, timeout=600)
            time.sleep(3)  # streams send `end` within an SSE poll of the finish
            streams.join(timeout=30)
            later = {n: c.log_lines(n) - k for n, k in after_start.items()}
        report.api = poller.outcomes
        note = f"Redis killed at step {at} for {down_seconds:.0f} s; log lines printed while it was down: {during}, after it came back: {later}"
        report.notes.append(note)
        log("  " + note)
        for j in jobs:
            with c.db.transaction() as s:
                last = s.scalar(select(m.Job.last_seq).where(m.Job.id == j.job_id)) or 0
            got = set(streams.got[j.job_id])
            missing = sorted(set(range(1, last + 1)) - got)
            dupes = len(streams.got[j.job_id]) - len(got)
            report.notes.append(
                f"SSE {j.spec.name}: {len(got)}/{last} messages, {len(missing)} missing, "
                f"{dupes} repeated, end frame {'yes' if streams.ended[j.job_id] else 'NO'}"
                + (f", error {streams.errors[j.job_id]}" if j.job_id in streams.errors else "")
            )
            if missing or not streams.ended[j.job_id]:
                report.lost.append(f"{j.spec.name}: SSE stream missed {len(missing)} messages")
        report.crashes = [
            f"worker {w} exited by itself (rc {rc}): {line}" for w, rc, line in sup.crashes
        ]
        audit(report, c, jobs, steps)
    return report


def datadir_unavailable(
    tmp: Path,
    *,
    down_seconds: float = 5.0,
    steps: int = 60,
    checkpoint_every: int = 2,
    size_mb: int = 64,
    lease_seconds: float = 3.0,
    log: LOG = _quiet,
) -> Report:
    """The data directory (uploads, checkpoints, adapters) on a tmpfs of its own: made
    read-only a third into the run, then full two thirds in, `down_seconds` each. A worker
    that exits is replaced; a paused job is resumed once the directory is usable again."""
    report = Report("data directory read-only / full", runs=2)
    rows, specs = workload(steps, checkpoint_every)
    data = tmp / "data"
    with (
        tmpfs(data, size_mb),
        _scenario(tmp, report, data_dir=data, lease_seconds=lease_seconds, log=log) as (c, _, _),
    ):
        jobs = c.submit(rows, specs)
        sup = Supervisor(c, "w", want=1)
        sup.fill()
        sup.resume_paused = False
        with Poller(jobs) as poller:
            at = sup.reach(jobs, steps // 3, timeout=300)
            remount(data, "ro")
            _hold(sup, jobs, down_seconds)
            remount(data, "rw")
            report.notes.append(
                f"read-only at step {at} for {down_seconds:.0f} s: {_states(c, jobs)}"
            )
            log("  " + report.notes[-1])
            sup.resume_paused = True
            at = sup.reach(jobs, 2 * steps // 3, timeout=300)
            sup.resume_paused = False
            filler = fill(data)
            _hold(sup, jobs, down_seconds)
            filler.unlink()
            report.notes.append(f"full at step {at} for {down_seconds:.0f} s: {_states(c, jobs)}")
            log("  " + report.notes[-1])
            sup.resume_paused = True
            sup.finish(jobs, timeout=600)
        report.api = poller.outcomes
        report.notes.append(f"tenants' paused jobs resumed {sup.resumed} times")
        report.crashes = [
            f"worker {w} exited by itself (rc {rc}): {line}" for w, rc, line in sup.crashes
        ]
        audit(report, c, jobs, steps)
    return report


def _hold(sup: Supervisor, jobs: list[Submitted], seconds: float) -> None:
    """Keep supervising (replacing crashed workers) for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sup.check(jobs)
        time.sleep(0.1)


def _states(c: Cluster, jobs: list[Submitted]) -> str:
    states = c.jobs([j.job_id for j in jobs]) or {}
    return ", ".join(f"{j.spec.name} {states.get(j.job_id, ('?', None))[0]}" for j in jobs)
