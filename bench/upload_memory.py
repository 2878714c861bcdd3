"""Peak RSS of `mixloom api` while N uploads of ~60 MiB each run at once.

    python bench/upload_memory.py .                       # this tree
    git archive REV mixloom migrations alembic.ini | tar -x -C /tmp/old
    python bench/upload_memory.py /tmp/old --label old    # the peer: an earlier revision

The server runs from ROOT (a folder holding `mixloom/` and `migrations/`) on a temp SQLite,
with max_concurrent_uploads (and its per-tenant share) = N so every upload is taken. RSS is the server's own:
before, the peak (VmHWM) and 2 s after the last upload answered.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

LINE = b'{"prompt": "' + b"x" * 400 + b'", "completion": "' + b"y" * 100 + b'"}\n'
MAKE_KEY = """
from mixloom.config import get_settings
from mixloom.storage import tenants
from mixloom.storage.db import Database
db = Database.connect(get_settings().resolved_database_url)
with db.transaction() as s:
    t = tenants.create_tenant(session=s, name="mem", max_total_bytes=10**11, max_file_bytes=10**9)
    _, key = tenants.create_api_key(session=s, tenant_id=t.id)
print(key)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--mib", type=int, default=60)
    args = parser.parse_args()
    root = args.root.resolve()
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "upload.jsonl"
    data.write_bytes(LINE * (args.mib * 1024 * 1024 // len(LINE)))
    env = dict(
        os.environ,
        PYTHONPATH=str(root),
        MIXLOOM_DATA_DIR=str(tmp / "data"),
        MIXLOOM_MAX_CONCURRENT_UPLOADS=str(args.uploads),
        MIXLOOM_MAX_CONCURRENT_UPLOADS_PER_TENANT=str(args.uploads),
        MIXLOOM_MAX_TENANT_BYTES=str(10**11),
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "mixloom.cli",
        "api",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen([*cmd, "--host", "127.0.0.1"], env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        key = subprocess.check_output([sys.executable, "-c", MAKE_KEY], env=env, cwd=root)
        auth = {"Authorization": f"Bearer {key.decode().strip()}"}

        def rss(field: str) -> int:
            for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1]) // 1024
            raise KeyError(field)

        def upload(i: int) -> int:
            with open(data, "rb") as f:
                files = {"file": (f"u{i}.jsonl", f)}
                form = {"purpose": "fine-tune"}
                r = httpx.post(
                    f"{base}/v1/files", headers=auth, files=files, data=form, timeout=900
                )
            return r.status_code

        before = rss("VmRSS")
        started = time.perf_counter()
        with cf.ThreadPoolExecutor(args.uploads) as pool:
            statuses = list(pool.map(upload, range(args.uploads)))
        took = time.perf_counter() - started
        time.sleep(2)
        print(
            f"{args.label}: {args.uploads} x {data.stat().st_size / 2**20:.0f} MiB uploads at "
            f"once, statuses {sorted(set(statuses))}, {took:.0f} s; server RSS before "
            f"{before} MiB, peak {rss('VmHWM')} MiB, after {rss('VmRSS')} MiB"
        )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
