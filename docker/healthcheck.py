"""Container health checks (stdlib only, so it runs before anything else is imported).

mixloom-healthcheck api      GET /healthz on the local API
mixloom-healthcheck worker   the worker process (PID 1) is alive and the database answers
"""

from __future__ import annotations

import os
import sys
import urllib.request


def api() -> None:
    port = os.environ.get("MIXLOOM_PORT", "8000")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as response:
        if response.status != 200:
            raise SystemExit(f"/healthz answered {response.status}")


def worker() -> None:
    with open("/proc/1/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
    if b"worker" not in cmdline:
        raise SystemExit(f"PID 1 is not the mixloom worker: {cmdline!r}")
    with open("/proc/1/status") as f:
        state = next((line for line in f if line.startswith("State:")), "")
    if "Z" in state.split(":", 1)[-1]:
        raise SystemExit("the worker process is a zombie")
    url = os.environ.get("MIXLOOM_DATABASE_URL")
    if url:
        from sqlalchemy import text

        from mixloom.storage.db import make_engine

        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()


if __name__ == "__main__":
    checks = {"api": api, "worker": worker}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        raise SystemExit(f"usage: mixloom-healthcheck {'|'.join(checks)}")
    checks[sys.argv[1]]()
