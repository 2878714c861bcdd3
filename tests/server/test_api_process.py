"""`mixloom api` as a process: it migrates an empty data dir, serves, and never imports
torch (the API stays light and starts fast)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def test_api_process_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from mixloom.config import Settings\n"
        "from mixloom.server.app import create_app\n"
        "import mixloom.storage.cli, mixloom.server.cli, mixloom.data.formats\n"
        f"create_app(Settings(data_dir={str(tmp_path)!r}), run_migrations=True)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'triton', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert not [m for m in sys.modules if m.startswith(('mixloom.trainer.', 'mixloom.kernels.'))]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_mixloom_api_serves(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXLOOM_")}
    env["MIXLOOM_DATA_DIR"] = str(tmp_path / "data")
    cmd = [sys.executable, "-m", "mixloom.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                assert time.monotonic() < deadline, "mixloom api did not start"
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "smollm2-135m"
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/docs", timeout=5).status_code == 200
        r = httpx.get(f"http://127.0.0.1:{port}/v1/fine_tuning/jobs", timeout=5)
        assert r.status_code == 401  # the schema was migrated at start: auth ran against it
        assert (tmp_path / "data" / "mixloom.db").exists()
    finally:
        proc.terminate()
        proc.wait(10)
