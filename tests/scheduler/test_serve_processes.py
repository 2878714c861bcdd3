"""`mixloom serve` runs the API and the worker as two supervised child processes: killing
either one leaves the other serving, and the dead one is started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import REPO, free_port, wait_for

pytestmark = pytest.mark.timeout(300)


def _children(pid: int) -> dict[str, int]:
    """{"api": pid, "worker": pid} of serve's live children."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    found = {}
    for child in map(int, out.split()):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        for name in ("api", "worker"):
            if name.encode() in argv:
                found[name] = child
    return found


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_killing_either_child_leaves_the_other_and_it_comes_back(
    tmp_path: Path, tiny_base: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXLOOM_")}
    env.update(
        MIXLOOM_DATA_DIR=str(tmp_path / "data"),
        MIXLOOM_BASE_MODEL=str(tiny_base),
        MIXLOOM_DEVICE="cpu",
        OMP_NUM_THREADS="1",
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixloom.cli", "serve", "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _up(url), timeout=120, every=0.2)
        first = wait_for(lambda: (c := _children(proc.pid)).keys() == {"api", "worker"} and c)
        assert _nice(first["api"]) > _nice(first["worker"])  # training keeps priority

        os.kill(first["worker"], signal.SIGKILL)
        assert _up(url)
        again = wait_for(
            lambda: (
                (c := _children(proc.pid)).get("worker", first["worker"]) != first["worker"] and c
            ),
            timeout=60,
        )
        assert again["api"] == first["api"] and _up(url)

        os.kill(again["api"], signal.SIGKILL)
        wait_for(lambda: _up(url), timeout=60, every=0.2)
        last = _children(proc.pid)
        assert last["worker"] == again["worker"]  # the worker went on
        assert last["api"] != again["api"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=150)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert not _children(proc.pid)
