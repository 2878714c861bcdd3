"""A Redis outage under the progress bus: callers see no error (the database is the source
of truth), and the log says so once, then once a minute, then once when Redis is back.

The outage is a redis-server of this test's own on a free port, killed and restarted;
the shared Redis is never touched."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mixloom.storage.bus import RedisBus, bus_outage
from mixloom.storage.ids import new_id

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    def __init__(self, tmp: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
        self.exe, self.tmp, self.port = exe, tmp, _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _msg(seq: int) -> dict[str, object]:
    return {"id": seq, "event": "metrics", "data": {"step": seq}}


def test_an_outage_logs_once_and_its_end_once(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    bus = RedisBus(own_redis.url)
    job = new_id("ftjob")
    sub = bus.subscribe(job)
    bus.publish(job, _msg(1))
    assert [m["id"] for m in sub.get(1.0)] == [1]
    assert bus.wait_for_wake(0.05) is False

    own_redis.kill()
    caplog.set_level(logging.INFO)
    caplog.clear()
    # what the API, the SSE streams and the worker do for 5 s: none of it raises
    started = time.monotonic()
    calls = 0
    while time.monotonic() - started < 5:
        bus.publish(job, _msg(2))
        bus.wake()
        assert sub.get(0.02) == []
        assert bus.wait_for_wake(0.02) is False
        calls += 4
    assert calls > 100
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) <= 3, lines
    assert any("Redis is unreachable" in line for line in lines), lines
    assert all(r.exc_info is None for r in caplog.records)  # no tracebacks
    assert bus.outage.since is not None

    caplog.clear()
    own_redis.start()
    deadline = time.monotonic() + 10
    while bus.outage.since is not None:
        assert time.monotonic() < deadline, "the bus did not notice Redis is back"
        bus.publish(job, _msg(3))
        time.sleep(0.1)
    for _ in range(20):  # more successful calls log nothing more
        bus.publish(job, _msg(4))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "Redis is back after" in lines[0], lines
    # and it works again: a wake-up reaches a waiting worker
    bus.wait_for_wake(0.05)
    waker = threading.Timer(0.1, bus.wake)
    waker.start()
    assert bus.wait_for_wake(5.0) is True
    waker.join()  # its reply read before the client closes
    bus.close()


def test_a_long_outage_logs_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    outage = bus_outage(interval=60, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="mixloom.bus")
    for _ in range(1500):  # 150 s of failing calls, ten a second
        outage.failed(ConnectionError("Connection refused"))
        now[0] += 0.1
    outage.ok()
    outage.ok()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # the start, after 60 s and 120 s, the end
    assert "unreachable" in lines[0] and "still unreachable after 60 s" in lines[1]
    assert "back after 150 s (1500 failed calls)" in lines[3]
