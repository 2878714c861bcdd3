"""`mixloom api`: the REST API alone (production; workers run elsewhere)."""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
from typing import Any


def register(sub: Any) -> None:
    api = sub.add_parser("api", help="run the REST API alone (production; workers run apart)")
    api.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)"
    )
    api.add_argument("--port", type=int, default=8000, help="the port (default 8000)")
    api.add_argument(
        "--no-migrate", action="store_true", help="do not upgrade the database schema at start"
    )
    api.add_argument("--log-level", default="info", help="debug, info (default), warning or error")
    api.add_argument(
        "--access-log",
        action="store_true",
        help="log every request (at --log-level info); off by default: it cost 0.5 ms of "
        "the server's 2.9 ms CPU per GET (bench/load_api.py, 2026-12-03)",
    )
    api.add_argument(
        "--workers",
        type=int,
        help="server processes (default MIXLOOM_API_WORKERS, 1); each has its own auth cache "
        "and rate-limit buckets",
    )
    api.set_defaults(func=_api)


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from mixloom.config import get_settings
    from mixloom.server.app import create_app
    from mixloom.storage import migrate

    settings = get_settings()
    workers = args.workers or settings.api_workers
    if workers <= 1:
        app = create_app(settings, run_migrations=not args.no_migrate)
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=args.access_log,
        )
        return 0
    # One Python process serves about one core (the GIL): more share the port, each
    # building its app from the environment; the schema is migrated once, here.
    if not args.no_migrate:
        migrate.upgrade(settings.resolved_database_url)
    # /metrics: every process writes its counters under one folder, any one answers for all
    # (observability.py); a fresh folder per start, so no dead process's counts linger
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mixloom-metrics-")
        atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], True)
    uvicorn.run(
        "mixloom.server.app:create_app",
        factory=True,
        workers=workers,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
    )
    return 0
