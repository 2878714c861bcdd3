"""The API under load, beside a training job: requests/s, p50, p99 and errors per route
group, and the training job's steps/s without and with the load.

Starts everything itself on loopback and stops by itself:

  --mode api    `mixloom api` (--api-workers processes) on a fresh Postgres database, Redis
                as the bus, and, with --train, a `mixloom worker` process beside it
  --mode serve  `mixloom serve` (SQLite; the API and the worker as its two child processes)

then makes tenants and keys through the storage layer, uploads a file and creates jobs per
tenant through HTTP (all cancelled but one, which trains), measures the training step rate
for --quiet-seconds, then drives each --clients count for --seconds, each followed by
another quiet window (the loaded rate is compared with the mean of the two around it):
keep-alive clients, each on one tenant, a mix of GET routes and some creates (uploads).
Server CPU per request is printed too: it holds steadier than requests/s when other work
shares the machine. The load generator is a minimal HTTP/1.1 client on asyncio, as light
as it can be, since it shares the cores with the server: its own CPU is printed (1-4% of a
core at 50-200 clients, 2026-12-03).

  python bench/load_api.py --mode api --train --tiny --clients 50 200 --seconds 20
  python bench/load_api.py --mode api --api-workers 2 --train --tiny --clients 50 200
  python bench/load_api.py --mode serve --train --tiny --train-threads 1 --clients 50 200
  python bench/load_api.py ... --pythonpath /tmp/base   # the server from another checkout

The peer: the same run's "no load" training rate, and the server from --pythonpath (e.g.
`git archive <commit> | tar -x -C /tmp/base`) run in the same conditions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "alpaca_demo_200.jsonl"
MODEL = "smollm2-135m"
JOBS = "/v1/fine_tuning/jobs"
# (weight, group): a mostly-reading client, as a dashboard or an SDK polling its jobs is
MIX = [
    (20, "list_jobs"),
    (20, "get_job"),
    (15, "list_events"),
    (15, "list_metrics"),
    (10, "list_files"),
    (10, "get_file"),
    (8, "models"),
    (2, "create_file"),
]
UPLOAD = b'{"prompt": "2+2=", "completion": "4"}\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Tenant:
    key: str
    file_ids: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)


# --- the stack under test ---------------------------------------------------------------


@contextmanager
def postgres_database() -> Iterator[str]:
    from mixloom.storage.testing import fresh_postgres_database

    with fresh_postgres_database() as url:
        yield url


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    cwd = env.get("PYTHONPATH") or REPO  # python -m puts the working folder first
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_up(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(
                f"the server exited ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:]
            )
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    sys.exit(f"the server did not come up in {timeout:.0f} s; see {log}")


@contextmanager
def stack(args: argparse.Namespace, tmp: Path) -> Iterator[tuple[str, str]]:
    """Yields (base url, database url) of a running server (and worker)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXLOOM_")}
    env["MIXLOOM_DATA_DIR"] = str(tmp / "data")
    env["MIXLOOM_MAX_QUEUED_JOBS"] = "1000"
    env["OMP_NUM_THREADS"] = str(args.train_threads)
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny import save_tiny_base

        env["MIXLOOM_BASE_MODEL"] = args.model = str(save_tiny_base(tmp / "tiny-base"))
    for pair in args.env:
        k, _, v = pair.partition("=")
        env[k] = v
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    cli = [sys.executable, "-m", "mixloom.cli"]
    with ExitStack() as stack:
        if args.mode == "api":
            db_url = stack.enter_context(postgres_database())
            env["MIXLOOM_DATABASE_URL"] = db_url
            env["MIXLOOM_REDIS_URL"] = args.redis_url
            cmd = [*cli, "api", "--host", "127.0.0.1", "--port", str(port)]
            if args.api_workers > 1:
                cmd += ["--workers", str(args.api_workers)]
        else:
            db_url = f"sqlite:///{tmp / 'data' / 'mixloom.db'}"
            cmd = [*cli, "serve", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--log-level", args.log_level]
        subprocess.run([*cli, "db", "upgrade"], cwd=args.pythonpath or REPO, env=env, check=True)
        server = _spawn(cmd, env, tmp / "server.log")
        (tmp / "server.pid").write_text(str(server.pid))
        stack.callback(_stop, server)
        url = f"http://127.0.0.1:{port}"
        _wait_up(url, server, tmp / "server.log")
        if args.mode == "api" and args.train:
            worker = _spawn([*cli, "worker", "--no-migrate"], env, tmp / "worker.log")
            stack.callback(_stop, worker)
        yield url, db_url


def setup_tenants(
    url: str, db_url: str, args: argparse.Namespace
) -> tuple[list[Tenant], str | None]:
    """Tenants, keys, a file and --jobs-per-tenant cancelled jobs each; with --train, one
    running job. Returns the tenants and the training job's id."""
    from mixloom.storage import tenants
    from mixloom.storage.db import Database

    db = Database.connect(db_url)
    out: list[Tenant] = []
    with db.transaction() as s:
        for i in range(args.tenants):
            t = tenants.create_tenant(session=s, name=f"load-{i}-{random.randrange(10**9)}")
            out.append(Tenant(key=tenants.create_api_key(session=s, tenant_id=t.id)[1]))
    db.dispose()
    lora = {"r": 4, "batch_size": 1, "max_seq_len": 64, "n_epochs": 1}
    with httpx.Client(base_url=url, timeout=60) as c:
        for t in out:
            h = {"Authorization": f"Bearer {t.key}"}
            r = c.post(
                "/v1/files",
                headers=h,
                files={"file": ("t.jsonl", DATA.read_bytes())},
                data={"purpose": "fine-tune"},
            )
            r.raise_for_status()
            t.file_ids.append(r.json()["id"])
            for _ in range(args.jobs_per_tenant):
                body = {
                    "model": args.model,
                    "training_file": t.file_ids[0],
                    "method": {"type": "lora", "lora": {"hyperparameters": lora}},
                }
                r = c.post(JOBS, headers=h, json=body)
                r.raise_for_status()
                job_id = r.json()["id"]
                c.post(f"{JOBS}/{job_id}/cancel", headers=h).raise_for_status()
                t.job_ids.append(job_id)
        train_id = None
        if args.train:
            h = {"Authorization": f"Bearer {out[0].key}"}
            hp = {"r": 4, "n_epochs": 100, "max_seq_len": args.train_seq_len}
            hp["batch_size"] = args.train_batch
            body = {
                "model": args.model,
                "training_file": out[0].file_ids[0],
                "method": {"type": "lora", "lora": {"hyperparameters": hp}},
            }
            r = c.post(JOBS, headers=h, json=body)
            r.raise_for_status()
            train_id = r.json()["id"]
            out[0].job_ids.append(train_id)
    return out, train_id


class StepClock:
    """The training job's last recorded step and its time, read from the database."""

    def __init__(self, db_url: str, job_id: str) -> None:
        from mixloom.storage.db import Database

        self.db = Database.connect(db_url)
        self.job_id = job_id

    def last(self) -> tuple[int, float] | None:
        from sqlalchemy import select

        from mixloom.storage import models as m

        with self.db.transaction() as s:
            row = s.execute(
                select(m.JobMetric.step, m.JobMetric.created_at)
                .where(m.JobMetric.job_id == self.job_id)
                .order_by(m.JobMetric.seq.desc())
                .limit(1)
            ).first()
        return (int(row[0]), row[1].timestamp()) if row else None

    def wait_running(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.last() is None:
            if time.monotonic() > deadline:
                sys.exit("the training job recorded no step; see the server/worker log")
            time.sleep(1)

    def rate_over(self, start: tuple[int, float] | None) -> float:
        end = self.last()
        if start is None or end is None or end[1] <= start[1]:
            return float("nan")
        return (end[0] - start[0]) / (end[1] - start[1])


# --- the load generator -----------------------------------------------------------------


class Conn:
    """One keep-alive HTTP/1.1 connection; just enough of the protocol for this server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, headers: str, body: bytes = b""
    ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: l\r\n{headers}Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and b"close" in value.lower():
                close = True
        data = await self.reader.readexactly(length)
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _multipart() -> tuple[str, bytes]:
    boundary = "loadbench7MA4YWxkTrZu0gW"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="u.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + UPLOAD
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return f"multipart/form-data; boundary={boundary}", body


async def client(
    port: int,
    tenant: Tenant,
    until: float,
    seed: int,
    samples: dict[str, list[float]],
    errors: dict[str, Any],
) -> None:
    rng = random.Random(seed)
    weights = [w for w, _ in MIX]
    groups = [g for _, g in MIX]
    auth = f"Authorization: Bearer {tenant.key}\r\n"
    content_type, upload = _multipart()
    conn = Conn(port)
    while time.perf_counter() < until:
        group = rng.choices(groups, weights)[0]
        job = rng.choice(tenant.job_ids)
        file_id = rng.choice(tenant.file_ids)
        method, body, headers = "GET", b"", auth
        path = {
            "list_jobs": JOBS + "?limit=20",
            "get_job": f"{JOBS}/{job}",
            "list_events": f"{JOBS}/{job}/events?limit=20",
            "list_metrics": f"{JOBS}/{job}/metrics?limit=100",
            "list_files": "/v1/files?limit=20",
            "get_file": f"/v1/files/{file_id}",
            "models": "/v1/models",
            "create_file": "/v1/files",
        }[group]
        if group == "create_file":
            method, body = "POST", upload
            headers = auth + f"Content-Type: {content_type}\r\n"
        t0 = time.perf_counter()
        try:
            status, data = await conn.request(method, path, headers, body)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            conn.close()
            status, data = 0, repr(exc).encode()
        elapsed = time.perf_counter() - t0
        samples[group].append(elapsed)
        if status != 200:
            errors[f"{group} {status}"] += 1
            errors.setdefault(f"{group} {status} first", data[:300].decode(errors="replace"))
    conn.close()


async def stream(port: int, tenant: Tenant, job: str, until: float, out: dict[str, Any]) -> None:
    """One SSE stream of a job, held until `until`: the time to its first frame (the job's
    history is replayed at once), and whether it stayed open to the end."""
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        out["refused"][repr(exc)] += 1
        return
    try:
        writer.write(
            f"GET {JOBS}/{job}/stream HTTP/1.1\r\nHost: l\r\n"
            f"Authorization: Bearer {tenant.key}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        status = int((await reader.readline()).split(b" ", 2)[1])
        if status != 200:
            out["refused"][str(status)] += 1
            return
        first, finished = None, False
        while (left := until - time.perf_counter()) > 0:
            try:
                line = await asyncio.wait_for(reader.readline(), left)
            except TimeoutError:
                break
            if not line:
                out["ended" if finished else "cut"] += 1
                return
            finished = finished or line.startswith(b"event: end")
            if first is None and line.startswith((b"id:", b"event:", b"data:")):
                first = time.perf_counter() - t0
                out["first"].append(first)
        out["held"] += 1
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        out["refused"][repr(exc)[:60]] += 1
    finally:
        writer.close()


def drive(
    port: int, tenants: list[Tenant], clients: int, seconds: float, streams: int = 0
) -> dict[str, Any]:
    samples: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, Any] = defaultdict(int)
    held: dict[str, Any] = {"n": streams, "first": [], "held": 0, "ended": 0, "cut": 0}
    held["refused"] = defaultdict(int)

    async def main() -> None:
        until = time.perf_counter() + seconds
        await asyncio.gather(
            *(
                client(port, tenants[i % len(tenants)], until, i, samples, errors)
                for i in range(clients)
            ),
            *(
                stream(port, t, t.job_ids[i % len(t.job_ids)], until, held)
                for i in range(streams)
                for t in [tenants[i % len(tenants)]]
            ),
        )

    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    cpu0, t0 = time.process_time(), time.perf_counter()
    run(main())
    wall = time.perf_counter() - t0
    return {
        "samples": samples,
        "errors": errors,
        "streams": held,
        "wall": wall,
        "generator_cpu": (time.process_time() - cpu0) / wall,
    }


class CpuMeter:
    """CPU seconds of the server (with its child processes) and of the Postgres backends
    serving its database: per request, this holds steady when other work shares the
    machine, where requests/s does not."""

    def __init__(self, server_pid: int, db_name: str | None) -> None:
        self.server = psutil.Process(server_pid)
        self.db_name = db_name

    def _server_procs(self) -> list[psutil.Process]:
        """`mixloom serve`'s worker child trains: not counted (in one process, it is)."""
        procs = [self.server, *self.server.children(recursive=True)]
        return [p for p in procs if " worker" not in " ".join(p.cmdline())]

    def _postgres_procs(self) -> list[psutil.Process]:
        if not self.db_name:
            return []
        out = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["name"] == "postgres" and f" {self.db_name} " in cmdline:
                out.append(proc)
        return out

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> dict[int, float]:
        out = {}
        for proc in procs:
            try:
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def sample(self) -> tuple[dict[int, float], dict[int, float]]:
        return self._cpu(self._server_procs()), self._cpu(self._postgres_procs())

    @staticmethod
    def since(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def table(clients: int, result: dict[str, Any]) -> str:
    wall = result["wall"]
    n = sum(len(v) for v in result["samples"].values())
    lines = [
        f"\n{clients} clients, {wall:.0f} s, load generator CPU {result['generator_cpu']:.0%} of a core",
        f"CPU per request: server {result['server_cpu'] / n * 1e3:.2f} ms, "
        f"Postgres {result['postgres_cpu'] / n * 1e3:.2f} ms; server {result['server_cpu'] / wall:.0%} "
        f"of a core",
        f"{'route group':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}",
    ]
    groups = [g for _, g in MIX]
    gets = [s for g in groups if g != "create_file" for s in result["samples"][g]]
    for g, values in [(g, result["samples"][g]) for g in groups] + [("all GETs", gets)]:
        errs = sum(
            n
            for k, n in result["errors"].items()
            if isinstance(n, int)
            and k.split()[0] == g
            or (g == "all GETs" and not k.startswith("create"))
        )
        lines.append(
            f"{g:<14} {len(values) / wall:>8.1f} {pct(values, 0.5) * 1e3:>8.1f} "
            f"{pct(values, 0.99) * 1e3:>8.1f} {errs:>7}"
        )
    if result["errors"]:
        lines.append("errors: " + json.dumps(dict(result["errors"])))
    held = result["streams"]
    if held["n"]:
        lines.append(
            f"SSE streams: {held['n']} opened beside the load: {held['held']} held to the end, "
            f"{held['ended']} closed after their end frame (the job had finished), "
            f"{held['cut']} cut off, refused {dict(held['refused']) or 0}; first frame "
            f"p50 {pct(held['first'], 0.5) * 1e3:.0f} ms, p99 {pct(held['first'], 0.99) * 1e3:.0f} ms"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mode", choices=["api", "serve"], default="api")
    p.add_argument("--clients", type=int, nargs="+", default=[50, 200])
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument(
        "--streams", type=int, default=0, help="SSE streams held open during each load window"
    )
    p.add_argument("--train", action="store_true", help="a training job runs during the load")
    p.add_argument("--quiet-seconds", type=float, default=30, help="training rate without load")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="train tests/tiny.py's 2-layer model (steps of milliseconds: the worker's own "
        "Python and database work is what API load can starve) instead of SmolLM2-135M",
    )
    p.add_argument("--train-batch", type=int, default=1)
    p.add_argument("--train-seq-len", type=int, default=128)
    p.add_argument(
        "--train-threads", type=int, default=2, help="OMP_NUM_THREADS of the server/worker"
    )
    p.add_argument("--tenants", type=int, default=20)
    p.add_argument("--jobs-per-tenant", type=int, default=5)
    p.add_argument("--api-workers", type=int, default=1, help="mode api: `mixloom api --workers`")
    p.add_argument(
        "--log-level",
        default="info",
        help="the server's log level (requests are logged only with `mixloom api --access-log`)",
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--pythonpath", help="run the server from this checkout instead")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    p.add_argument("--profile", help="py-spy the server during the first load into this file")
    args = p.parse_args()
    args.model = MODEL

    tmp = Path(tempfile.mkdtemp(prefix="mixloom-load-"))
    print(f"mode {args.mode}, logs in {tmp}, server from {args.pythonpath or REPO}", flush=True)
    try:
        with stack(args, tmp) as (url, db_url):
            port = int(url.rsplit(":", 1)[1])
            tenant_list, train_id = setup_tenants(url, db_url, args)
            clock = StepClock(db_url, train_id) if train_id else None
            quiet = float("nan")

            def quiet_rate() -> float:
                assert clock is not None
                start = clock.last()
                time.sleep(args.quiet_seconds)
                rate = clock.rate_over(start)
                print(f"training without load: {rate:.2f} steps/s", flush=True)
                return rate

            if clock is not None:
                clock.wait_running(600)
                time.sleep(5)  # past the first steps' warm-up
                quiet = quiet_rate()
            server_pid = int((tmp / "server.pid").read_text())
            meter = CpuMeter(server_pid, db_url.rsplit("/", 1)[1] if args.mode == "api" else None)
            for n in args.clients:
                start = clock.last() if clock else None
                before = meter.sample()
                profiler = None
                if args.profile and n == args.clients[0]:
                    profiler = subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "-p",
                            str(server_pid),
                            "-d",
                            str(int(args.seconds * 0.8)),
                            "-r",
                            "200",
                            "-f",
                            "raw",
                            "-o",
                            args.profile,
                            "--nonblocking",
                            "--subprocesses",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                result = drive(port, tenant_list, n, args.seconds, args.streams)
                after = meter.sample()
                result["server_cpu"] = meter.since(before[0], after[0])
                result["postgres_cpu"] = meter.since(before[1], after[1])
                if profiler is not None:
                    profiler.wait()
                print(table(n, result), flush=True)
                if clock is not None:
                    # against the quiet windows before and after it: other work on the
                    # machine drifts, and a step rate follows it
                    loaded = clock.rate_over(start)
                    after_rate = quiet_rate()
                    reference = (quiet + after_rate) / 2
                    print(
                        f"training under load: {loaded:.2f} steps/s "
                        f"({loaded / reference:.2f}x of {reference:.2f}, the mean of the "
                        "quiet windows before and after)",
                        flush=True,
                    )
                    quiet = after_rate
            if clock is not None:
                clock.db.dispose()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
