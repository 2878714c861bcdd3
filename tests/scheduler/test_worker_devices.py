"""`mixloom worker --devices ...`: one worker process per device under one supervisor, each
restarted when it dies, all stopped by a SIGTERM to the supervisor. On CPU: `--devices
cpu,cpu` (two CPU workers); `--devices all` on a machine with no GPU is a clear error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import REPO, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

from mixloom.errors import ConfigError
from mixloom.observability import WORKER_INFO
from mixloom.scheduler.cli import worker_devices

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc"),
]


def _workers(pid: int) -> dict[str, int]:
    """The supervisor's live worker children: {their --worker-id: pid}."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    found = {}
    for child in map(int, out.split()):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and "--worker-id" in argv:
            assert argv[argv.index("--device") + 1] == "cpu"
            found[argv[argv.index("--worker-id") + 1]] = child
    return found


def _metrics_worker(port: int) -> str | None:
    """The worker id a child's /metrics names (None while it is not up yet)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == WORKER_INFO:
            return next((s.labels["worker_id"] for s in family.samples), None)
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_two_cpu_workers_one_killed_comes_back_sigterm_stops_both(
    tmp_path: Path, tiny_base: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXLOOM_")}
    env.update(
        MIXLOOM_DATA_DIR=str(tmp_path / "data"),
        MIXLOOM_BASE_MODEL=str(tiny_base),
        OMP_NUM_THREADS="1",
    )
    log = open(tmp_path / "workers.log", "wb")  # noqa: SIM115
    port = free_port()
    proc = subprocess.Popen(
        [*(sys.executable, "-m", "mixloom.cli"), "worker", "--devices", "cpu,cpu"]
        + ["--metrics-port", str(port)],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        first = wait_for(lambda: len(c := _workers(proc.pid)) == 2 and c, timeout=240)
        prefix = f"{socket.gethostname()}:{proc.pid}"
        assert sorted(first) == [f"{prefix}/cpu0.1", f"{prefix}/cpu1.1"]

        # each child its own /metrics port (PORT + its index), naming itself
        for index in range(2):
            want = f"{prefix}/cpu{index}.1"
            assert wait_for(lambda w=want, i=index: _metrics_worker(port + i) == w, timeout=240)

        os.kill(first[f"{prefix}/cpu1.1"], signal.SIGKILL)
        again = wait_for(lambda: f"{prefix}/cpu1.2" in (c := _workers(proc.pid)) and c, timeout=120)
        # the other went on; the dead one came back under a new id (its leases expire)
        assert again == {
            f"{prefix}/cpu0.1": first[f"{prefix}/cpu0.1"],
            f"{prefix}/cpu1.2": again[f"{prefix}/cpu1.2"],
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=150)
        log.close()
    text = (tmp_path / "workers.log").read_text()
    assert code == 0, text[-3000:]
    assert not any(_alive(pid) for pid in again.values())  # both stopped with it
    assert "the worker cpu1 process exited (-9)" in text
    assert "exited (1)" not in text and "Traceback" not in text, text[-3000:]


def test_devices_lists() -> None:
    assert worker_devices("cpu,cpu") == [("cpu0", "cpu", None), ("cpu1", "cpu", None)]
    import torch

    if torch.cuda.device_count() == 0:
        with pytest.raises(ConfigError, match="--devices all: this machine has no GPU"):
            worker_devices("all")
        with pytest.raises(ConfigError, match="'0' is not all, cpu or the index of one"):
            worker_devices("0,1")
    else:
        n = torch.cuda.device_count()
        assert [label for label, _, _ in worker_devices("all")] == [f"gpu{i}" for i in range(n)]


def test_devices_all_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")  # the error is for machines without one
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXLOOM_")}
    env["MIXLOOM_DATA_DIR"] = str(tmp_path / "data")
    run = subprocess.run(
        [sys.executable, "-m", "mixloom.cli", "worker", "--devices", "all"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "mixloom worker: error: --devices all: this machine has no GPU" in run.stderr
    assert not (tmp_path / "data").exists()  # nothing started, nothing migrated
