"""A real S3 server for tests: `moto_server` on 127.0.0.1 (a free port), a bucket in it, and
a loopback TCP proxy in front of it that a test closes and reopens to make the store
unreachable and back without losing what it holds."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from live_server import free_port

CREDENTIALS = {"s3_access_key_id": "testing", "s3_secret_access_key": "testing"}


@dataclass
class Moto:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen[bytes]

    def settings(self, bucket: str, endpoint: str | None = None) -> dict[str, Any]:
        """Settings' fields for a store in `bucket` (made if missing)."""
        make_bucket(self.url, bucket)
        return {
            "storage_url": f"s3://{bucket}/mixloom",
            "s3_endpoint_url": endpoint or self.url,
            "s3_region": "us-east-1",
            **CREDENTIALS,
        }

    def env(self, bucket: str, endpoint: str | None = None) -> dict[str, str]:
        return {f"MIXLOOM_{k.upper()}": str(v) for k, v in self.settings(bucket, endpoint).items()}


def make_bucket(url: str, bucket: str) -> None:
    request = urllib.request.Request(f"{url}/{bucket}", method="PUT")
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as exc:  # 409: it exists
        if exc.code != 409:
            raise


@contextmanager
def moto_server(log: Path) -> Iterator[Moto]:
    """`moto_server` started on a free loopback port, killed at the end."""
    binary = shutil.which("moto_server")
    assert binary is not None, "moto_server is not installed (pip install 'moto[server]')"
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, f"moto_server exited: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        yield Moto(url, proc)
    finally:
        proc.kill()
        proc.wait(timeout=30)


class Proxy:
    """127.0.0.1:port -> target, byte for byte; `close()` refuses and cuts connections
    (the store is unreachable), `open()` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.open()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, []
        if server is not None:
            server.close()
        for c in conns:
            with_suppressed(c.shutdown, socket.SHUT_RDWR)
            c.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._server is not server:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def with_suppressed(fn: Any, *args: Any) -> None:
    with suppress(OSError):
        fn(*args)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with_suppressed(dst.shutdown, socket.SHUT_WR)
