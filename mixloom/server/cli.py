"""`mixloom api`: the REST API alone (production; workers run elsewhere)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    api = sub.add_parser("api", help="run the REST API (no worker)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument(
        "--no-migrate", action="store_true", help="do not upgrade the database schema at start"
    )
    api.add_argument("--log-level", default="info")
    api.set_defaults(func=_api)


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from mixloom.server.app import create_app

    app = create_app(run_migrations=not args.no_migrate)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
