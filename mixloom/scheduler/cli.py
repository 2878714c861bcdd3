"""`mixloom worker` (a training worker) and `mixloom serve` (API + worker on one machine,
as two supervised processes)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from mixloom.config import Settings
from mixloom.errors import ConfigError


def register(sub: Any) -> None:
    w = sub.add_parser(
        "worker", help="train queued jobs on this machine's base model (any number of workers)"
    )
    _worker_flags(w)
    where = w.add_mutually_exclusive_group()
    where.add_argument(
        "--device",
        help="cpu, cuda, cuda:N or auto: the device this worker trains on "
        "(default $MIXLOOM_DEVICE, else auto)",
    )
    where.add_argument(
        "--devices",
        help="one worker process per device, under this one, each restarted if it dies: "
        "all (every visible GPU), GPU indices (0,1), or cpu,cpu (CPU workers)",
    )
    w.add_argument(
        "--no-migrate", action="store_true", help="do not upgrade the database schema at start"
    )
    w.set_defaults(func=_worker)

    s = sub.add_parser(
        "serve",
        help="the whole server on this machine: API and worker, each restarted if it dies "
        "(SQLite and uploads in $MIXLOOM_DATA_DIR, default ./mixloom-data; SmolLM2-135M)",
    )
    s.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)"
    )
    s.add_argument(
        "--port",
        type=int,
        default=8000,
        help="the port (default 8000: the client's default MIXLOOM_BASE_URL)",
    )
    _worker_flags(s)
    s.set_defaults(func=_serve)


def _worker_flags(p: argparse.ArgumentParser) -> None:
    """Flags over the worker_* fields of Settings (each flag's dest is the field's name)."""
    g = p.add_argument_group("worker (defaults from MIXLOOM_WORKER_* variables)")
    flags = [  # (flag, the Settings field, type, help)
        ("--worker-id", "worker_id", str, "a name for this worker in job events (default: host:pid)"),
        ("--base-model", "worker_base_model", str, "which of MIXLOOM_BASE_MODELS this worker holds, by name; it trains and answers only that base's jobs and requests (default: the first)"),
        ("--lease-seconds", "worker_lease_seconds", float, "how long a dead worker's jobs wait before another worker takes them, at least (default 30; leases grow by themselves to 3 steps' time on a slow machine)"),
        ("--heartbeat-seconds", "worker_heartbeat_seconds", float, "renew the leases this often (default: a third of --lease-seconds)"),
        ("--poll-seconds", "worker_poll_seconds", float, "look for new jobs this often (default 2)"),
        ("--step-token-budget", "worker_step_token_budget", int, "padded tokens (rows x longest row) in one fused step (default 16384)"),
        ("--memory-budget-gb", "worker_memory_budget_gb", float, "memory training may use (default: 90%% of the GPU, or the model and 80%% of free RAM)"),
        ("--metrics-interval-seconds", "worker_metrics_interval_seconds", float, "write a job's step metrics to the database this often (default 1)"),
        ("--max-jobs", "worker_max_jobs", int, "jobs trained at once (default 32)"),
        ("--metrics-port", "worker_metrics_port", int, "serve Prometheus metrics at http://MIXLOOM_WORKER_METRICS_HOST:PORT/metrics (default 0: off; `serve`: its --port + 1)"),
    ]  # fmt: skip
    g.add_argument(
        "--role",
        dest="worker_role",
        choices=["all", "training", "inference"],
        help="all (default): train, and decode inference requests between steps; training: "
        "train only; inference: decode only",
    )
    for name, dest, kind, text in flags:
        g.add_argument(name, dest=dest, type=kind, help=text)
    g.add_argument("--log-level", default="info", help="debug, info (default), warning or error")


def _given_worker_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: getattr(args, k)
        for k in Settings.model_fields
        if k.startswith("worker_") and getattr(args, k, None) is not None
    }


def _settings(args: argparse.Namespace) -> Settings:
    """The environment's settings, with the worker flags given on the command line."""
    device = getattr(args, "device", None)
    return Settings(**_given_worker_settings(args), **({"device": device} if device else {}))


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logging.getLogger("mixloom.worker").info(
            "signal %d: finishing the step, then leaving", signum
        )
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _worker(args: argparse.Namespace) -> int:
    from mixloom.scheduler.worker import Worker
    from mixloom.storage import migrate
    from mixloom.storage.bus import make_bus
    from mixloom.storage.db import Database

    _setup_logging(args.log_level)
    settings = _settings(args)
    if args.devices:
        return _workers(args, settings)
    if not args.no_migrate:
        migrate.upgrade(settings.resolved_database_url)
    if settings.worker_metrics_port:
        from mixloom.observability import start_worker_exporter

        start_worker_exporter(settings.worker_metrics_host, settings.worker_metrics_port)
    db = Database.connect(settings.resolved_database_url)
    bus = make_bus(settings.redis_url)
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        Worker(settings, db=db, bus=bus).run(stop)
    finally:
        bus.close()
        db.dispose()
    return 0


def _serve(args: argparse.Namespace) -> int:
    """The API and the worker as two supervised child processes (`mixloom api`, `mixloom
    worker`): a crash of one never takes the other down, and the one that died is started
    again. Apart, the API's threads cannot take the GIL from the training loop, and the API
    runs at a lower CPU priority (serve_api_nice), so API load does not starve training.

    Without Redis each child has its own in-process bus, so nothing crosses between them on
    it: the worker finds new jobs by polling the database (every worker_poll_seconds, 1 s
    here) and SSE streams read new events and metrics from the database every
    sse_poll_seconds (0.5 s here): that is an SSE frame's added latency."""
    from mixloom.storage import migrate

    _setup_logging(args.log_level)
    settings = _settings(args)
    migrate.upgrade(settings.resolved_database_url)
    env = dict(os.environ)
    for name, value in _given_worker_settings(args).items():
        env["MIXLOOM_" + name.upper()] = str(value)
    # the worker's metrics beside the API's /metrics, unless set (0: off)
    env.setdefault("MIXLOOM_WORKER_METRICS_PORT", str(args.port + 1))
    if not settings.redis_url:
        env.setdefault("MIXLOOM_SSE_POLL_SECONDS", str(SERVE_SSE_POLL_SECONDS))
        env.setdefault("MIXLOOM_WORKER_POLL_SECONDS", str(SERVE_WORKER_POLL_SECONDS))
    cli = [sys.executable, "-m", "mixloom.cli"]
    level = ["--log-level", args.log_level]
    children = [
        _Child(
            "api",
            [*cli, "api", "--no-migrate", "--host", args.host, "--port", str(args.port), *level],
            env,
            nice=settings.serve_api_nice,
        ),
        _Child("worker", [*cli, "worker", "--no-migrate", *level], env, nice=0),
    ]
    _supervise(children)
    return 0


def _workers(args: argparse.Namespace, settings: Settings) -> int:
    """`mixloom worker --devices ...`: one `mixloom worker` child per device, each pinned to
    its GPU (CUDA_VISIBLE_DEVICES: the child sees it alone, as cuda) and named after it
    (worker id PREFIX/gpuN.K: K counts its starts, so that a restarted child never renews
    the leases of the one that died: those expire and are taken over as any dead worker's).
    With a metrics port, the i-th child serves /metrics on that port + i."""
    import socket

    from mixloom.storage import migrate

    devices = worker_devices(args.devices)  # a bad list fails before anything starts
    if not args.no_migrate:
        migrate.upgrade(settings.resolved_database_url)
    env = dict(os.environ)
    for name, value in _given_worker_settings(args).items():
        if name != "worker_id":
            env["MIXLOOM_" + name.upper()] = str(value)
    env.pop("MIXLOOM_WORKER_ID", None)
    prefix = args.worker_id or settings.worker_id or f"{socket.gethostname()}:{os.getpid()}"
    level = ["--log-level", args.log_level]
    children = []
    port = settings.worker_metrics_port  # flag or environment; children count up from it
    for index, (label, device, visible) in enumerate(devices):
        child_env = env if visible is None else {**env, "CUDA_VISIBLE_DEVICES": visible}
        if port:  # each child its own /metrics port: PORT, PORT + 1, ...
            child_env = {**child_env, "MIXLOOM_WORKER_METRICS_PORT": str(port + index)}
        cmd = [sys.executable, "-m", "mixloom.cli", "worker", "--no-migrate", "--device", device]
        children.append(
            _Child(
                f"worker {label}",
                cmd,
                child_env,
                nice=0,
                argv_tail=_worker_id_args(f"{prefix}/{label}", level),
            )
        )
    _supervise(children)
    return 0


def _worker_id_args(name: str, more: list[str]) -> Callable[[int], list[str]]:
    """A supervised worker's arguments at its n-th start: its own id for that start."""
    return lambda starts: ["--worker-id", f"{name}.{starts}", *more]


def worker_devices(spec: str) -> list[tuple[str, str, str | None]]:
    """--devices as (label, the child's --device, its CUDA_VISIBLE_DEVICES or None) per
    worker: "all" (every GPU this process sees), GPU indices among those ("0,1"), or "cpu"
    entries ("cpu,cpu": CPU workers)."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    ids: list[str] = []  # CUDA_VISIBLE_DEVICES entries of the GPUs this process sees
    if entries == ["all"] or any(e != "cpu" for e in entries):
        import torch

        count = torch.cuda.device_count()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = (
            [v.strip() for v in visible.split(",")][:count]
            if visible
            else [str(i) for i in range(count)]
        )
    if entries == ["all"]:
        if not ids:
            raise ConfigError(
                "--devices all: this machine has no GPU that torch can see "
                "(torch.cuda.device_count() is 0); run one CPU worker with --device cpu, "
                "or several with --devices cpu,cpu"
            )
        entries = [str(i) for i in range(len(ids))]
    out: list[tuple[str, str, str | None]] = []
    for i, entry in enumerate(entries):
        if entry == "cpu":
            out.append((f"cpu{i}", "cpu", None))
        elif entry.isdigit() and int(entry) < len(ids):
            out.append((f"gpu{entry}", "cuda", ids[int(entry)]))
        else:
            raise ConfigError(
                f"--devices {spec}: {entry!r} is not all, cpu or the index of one of this "
                f"machine's {len(ids)} GPU{'s' if len(ids) != 1 else ''}"
            )
    if not out:
        raise ConfigError("--devices: name at least one device (all, 0,1, or cpu,cpu)")
    return out


def _supervise(children: list[_Child]) -> None:
    """Keep every child running (each started again when it exits) until SIGINT or
    SIGTERM, then stop them all: a worker finishes its step and checkpoints first."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        while not stop.is_set():
            for child in children:
                child.keep_running()
            stop.wait(0.5)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(timeout=WORKER_STOP_SECONDS if child.name.startswith("worker") else 30)


SERVE_SSE_POLL_SECONDS = 0.5
SERVE_WORKER_POLL_SECONDS = 1.0
WORKER_STOP_SECONDS = 120  # a stopping worker finishes its step and checkpoints its jobs
_RESTART_DELAYS_S = (1, 2, 5, 10, 30)  # after each crash in a row; a minute up resets it
_PR_SET_PDEATHSIG = 1


class _Child:
    """One child process of `mixloom serve`, started again (after a growing delay) when it
    exits. It gets SIGTERM if `serve` itself dies, and runs in its own process group so that
    a Ctrl-C reaches it once, from `serve`. Not its own session: Linux's autogroup scheduling
    shares the CPU between sessions whatever their nice values, which would undo
    serve_api_nice."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str],
        *,
        nice: int,
        argv_tail: Callable[[int], list[str]] | None = None,
    ) -> None:
        """`argv_tail`: more arguments for each start, given the number of that start
        (1, 2, ...)."""
        self.name, self.cmd, self.env, self.nice = name, cmd, env, nice
        self.argv_tail = argv_tail
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.crashes = 0
        self.started_at = 0.0
        self.restart_at = 0.0
        self.log = logging.getLogger("mixloom.serve")

    def _preexec(self) -> None:
        if self.nice:
            os.nice(self.nice)
        if sys.platform == "linux":
            import ctypes

            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    def keep_running(self) -> None:
        now = time.monotonic()
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                if now - self.started_at > 60:
                    self.crashes = 0
                return
            delay = _RESTART_DELAYS_S[min(self.crashes, len(_RESTART_DELAYS_S) - 1)]
            self.crashes += 1
            self.restart_at = now + delay
            self.proc = None
            self.log.error(
                "the %s process exited (%s); starting it again in %d s", self.name, code, delay
            )
        if now < self.restart_at:
            return
        self.starts += 1
        cmd = self.cmd + (self.argv_tail(self.starts) if self.argv_tail else [])
        self.proc = subprocess.Popen(cmd, env=self.env, preexec_fn=self._preexec, process_group=0)
        self.started_at = now
        self.log.info("%s process %d started", self.name, self.proc.pid)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.log.error("the %s process did not stop in %.0f s; killing it", self.name, timeout)
            self.proc.kill()
            self.proc.wait()
