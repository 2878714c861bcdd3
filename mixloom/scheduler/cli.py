"""`mixloom worker` (a training worker) and `mixloom serve` (API + worker in one process)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from mixloom.config import Settings


def register(sub: Any) -> None:
    w = sub.add_parser(
        "worker", help="train queued jobs on this machine's base model (any number of workers)"
    )
    _worker_flags(w)
    w.add_argument(
        "--no-migrate", action="store_true", help="do not upgrade the database schema at start"
    )
    w.set_defaults(func=_worker)

    s = sub.add_parser(
        "serve",
        help="API and worker in one process (default: SQLite, in-process bus, SmolLM2-135M)",
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    _worker_flags(s)
    s.set_defaults(func=_serve)


def _worker_flags(p: argparse.ArgumentParser) -> None:
    """Flags over the worker_* fields of Settings (each flag's dest is the field's name)."""
    g = p.add_argument_group("worker (defaults from MIXLOOM_WORKER_* variables)")
    flags = [  # (flag, the Settings field, type, help)
        ("--worker-id", "worker_id", str, "a name for this worker in job events"),
        ("--lease-seconds", "worker_lease_seconds", float, "lease length (default 30)"),
        ("--heartbeat-seconds", "worker_heartbeat_seconds", float, "default: a third of the lease"),
        ("--poll-seconds", "worker_poll_seconds", float, "look for new jobs this often (default 2)"),
        ("--step-token-budget", "worker_step_token_budget", int, "padded tokens per fused step"),
        ("--memory-budget-gb", "worker_memory_budget_gb", float, "default: 90%% of GPU / free RAM"),
        ("--metrics-interval-seconds", "worker_metrics_interval_seconds", float, "metrics to the DB this often"),
        ("--max-jobs", "worker_max_jobs", int, "jobs admitted at once (default 32)"),
    ]  # fmt: skip
    for name, dest, kind, text in flags:
        g.add_argument(name, dest=dest, type=kind, help=text)
    g.add_argument("--log-level", default="info")


def _settings(args: argparse.Namespace) -> Settings:
    """The environment's settings, with the worker flags given on the command line."""
    given = {
        k: getattr(args, k)
        for k in Settings.model_fields
        if k.startswith("worker_") and getattr(args, k, None) is not None
    }
    return Settings(**given)


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
    if not args.no_migrate:
        migrate.upgrade(settings.resolved_database_url)
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
    import uvicorn

    from mixloom.scheduler.worker import Worker
    from mixloom.server.app import create_app
    from mixloom.storage import migrate
    from mixloom.storage.bus import make_bus
    from mixloom.storage.db import Database

    _setup_logging(args.log_level)
    settings = _settings(args)
    migrate.upgrade(settings.resolved_database_url)
    db = Database.connect(settings.resolved_database_url)
    bus = make_bus(settings.redis_url)
    app = create_app(settings, db=db, bus=bus)
    stop = threading.Event()
    worker = Worker(settings, db=db, bus=bus)
    failed: list[BaseException] = []
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    )

    def work() -> None:
        try:
            worker.run(stop)
        except BaseException as exc:  # an API without its worker would queue jobs forever
            failed.append(exc)
            logging.getLogger("mixloom.worker").exception("the worker stopped; shutting down")
            server.should_exit = True

    thread = threading.Thread(target=work, name="mixloom-worker", daemon=True)
    thread.start()
    # uvicorn handles SIGINT/SIGTERM while it runs, then re-raises the signal to the handler
    # that was there before it: make that one stop the worker (checkpoint, release its jobs)
    # rather than the default, which would kill the process first.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server.run()
    finally:
        stop.set()
        thread.join(timeout=120)
        bus.close()
        db.dispose()
    return 1 if failed else 0
