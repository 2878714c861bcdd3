"""The progress bus: live job events and metrics from the worker to SSE streams, and
wake-ups from the API to idle workers.

Two implementations with one interface: `InProcessBus` (embedded default, API and worker
in one process) and `RedisBus` (Redis streams, any number of processes). Messages are dicts
`{"id": seq, "event": "event" | "metrics", "data": {...}}` where `seq` is the job's
sequence number from the database (see storage.jobs). The bus is for latency only: the
database holds every message, and readers fill gaps from it, so a lost or reordered bus
message delays a stream but never corrupts it.

So a Redis outage is no error to `RedisBus`'s callers: a publish or wake-up is dropped, a
read waits out its timeout and returns nothing, and one `Outage` (storage/outage.py) logs it once when it
starts, once a minute while it lasts, and once when Redis is back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from typing import Any, Protocol

from mixloom.storage.outage import OUTAGE_LOG_INTERVAL_S, Outage

PROGRESS_KEY_PREFIX = "mixloom:progress:"  # + job id: a Redis stream per job
PROGRESS_STREAM_MAXLEN = 2000  # messages kept per job on the bus (the database keeps all)
PROGRESS_STREAM_TTL_S = 24 * 3600  # a job's stream expires this long after its last message
WAKEUP_CHANNEL = "mixloom:wakeup"  # pub/sub channel: "a job became claimable"
_INPROCESS_IDLE_TTL_S = 3600.0  # in-process buffers of jobs silent this long are dropped
_REDIS_CONNECT_TIMEOUT_S = 2.0  # an unreachable host fails a call this soon

log = logging.getLogger("mixloom.bus")


class Subscription(Protocol):
    def get(self, timeout: float) -> list[dict[str, Any]]:
        """Messages published since the last call, waiting up to `timeout` s for the first."""
        ...

    def close(self) -> None: ...


class ProgressBus(Protocol):
    def publish(self, job_id: str, message: dict[str, Any]) -> None: ...

    def subscribe(self, job_id: str, *, after: int = 0) -> Subscription:
        """Buffered messages with id > `after`, then everything published later."""
        ...

    def wake(self) -> None:
        """Tell idle workers a job became claimable."""
        ...

    def wait_for_wake(self, timeout: float) -> bool:
        """Block up to `timeout` s for a wake(); True if one came. Workers poll anyway."""
        ...

    def close(self) -> None: ...


class _JobBuffer:
    def __init__(self) -> None:
        self.messages: deque[tuple[int, dict[str, Any]]] = deque(maxlen=PROGRESS_STREAM_MAXLEN)
        self.position = 0  # publish counter: cursors follow arrival order, not seq
        self.touched = time.monotonic()


class _InProcessSubscription:
    def __init__(self, bus: InProcessBus, job_id: str, after: int) -> None:
        self._bus = bus
        self._job_id = job_id
        self._after = after
        self._cursor: int | None = None  # None: first call filters the buffer by seq

    def get(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._bus._cond:
            while True:
                buf = self._bus._buffers.get(self._job_id)
                out: list[dict[str, Any]] = []
                if buf is not None:
                    if self._cursor is None:
                        out = [msg for _, msg in buf.messages if msg["id"] > self._after]
                    else:
                        out = [msg for pos, msg in buf.messages if pos > self._cursor]
                    self._cursor = buf.position
                elif self._cursor is None:
                    self._cursor = 0
                remaining = deadline - time.monotonic()
                if out or remaining <= 0:
                    return out
                self._bus._cond.wait(remaining)

    def close(self) -> None:
        pass


class InProcessBus:
    """Thread-safe, bounded, in memory. For one process: `mixloom serve` and the tests."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._buffers: dict[str, _JobBuffer] = {}
        self._wakeups = 0

    def publish(self, job_id: str, message: dict[str, Any]) -> None:
        with self._cond:
            now = time.monotonic()
            buf = self._buffers.get(job_id)
            if buf is None:
                self._prune(now)
                buf = self._buffers[job_id] = _JobBuffer()
            buf.position += 1
            buf.messages.append((buf.position, message))
            buf.touched = now
            self._cond.notify_all()

    def _prune(self, now: float) -> None:
        stale = [j for j, b in self._buffers.items() if now - b.touched > _INPROCESS_IDLE_TTL_S]
        for job_id in stale:
            del self._buffers[job_id]

    def subscribe(self, job_id: str, *, after: int = 0) -> Subscription:
        return _InProcessSubscription(self, job_id, after)

    def wake(self) -> None:
        with self._cond:
            self._wakeups += 1
            self._cond.notify_all()

    def wait_for_wake(self, timeout: float) -> bool:
        with self._cond:
            seen = self._wakeups
            return self._cond.wait_for(lambda: self._wakeups != seen, timeout)

    def close(self) -> None:
        pass


def bus_outage(interval: float = OUTAGE_LOG_INTERVAL_S, **kw: Any) -> Outage:
    return Outage(
        "progress bus: Redis",
        meanwhile="live streams and idle workers fall back to polling the database until it "
        "is back",
        logger=log,
        interval=interval,
        **kw,
    )


def _outage_errors() -> tuple[type[Exception], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError)


class _RedisSubscription:
    def __init__(self, bus: RedisBus, job_id: str, after: int) -> None:
        self._bus = bus
        self._client: Any = bus._client
        self._key = PROGRESS_KEY_PREFIX + job_id
        self._after = after
        self._cursor: str | None = None  # Redis stream id; None: first call reads the buffer

    def get(self, timeout: float) -> list[dict[str, Any]]:
        try:
            out = self._read(timeout)
        except self._bus._errors as exc:
            self._bus.outage.failed(exc)
            time.sleep(timeout)  # as if quiet: the caller reads the database instead
            return []
        self._bus.outage.ok()
        return out

    def _read(self, timeout: float) -> list[dict[str, Any]]:
        if self._cursor is None:
            entries = self._client.xrange(self._key)
            self._cursor = entries[-1][0] if entries else "0-0"
            out = [m for m in map(_decode, entries) if m["id"] > self._after]
            if out:
                return out
        # Redis reads BLOCK 0 as "forever": wait at least 1 ms.
        block_ms = max(1, int(timeout * 1000))
        reply = self._client.xread({self._key: self._cursor}, block=block_ms)
        if not reply:
            return []
        entries = reply[0][1]
        self._cursor = entries[-1][0]
        return [_decode(e) for e in entries]

    def close(self) -> None:
        pass


def _decode(entry: tuple[Any, dict[Any, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(entry[1]["m"])
    return message


class RedisBus:
    """Redis streams (`PROGRESS_KEY_PREFIX + job_id`), bounded and expiring. Connection
    errors never reach the caller (see the module's docstring); `ping` alone raises them."""

    def __init__(self, url: str, *, outage: Outage | None = None) -> None:
        import redis

        self._client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=_REDIS_CONNECT_TIMEOUT_S
        )
        self._pubsub: Any = None
        self._lock = threading.Lock()
        self._errors = _outage_errors()
        self.outage = outage or bus_outage()

    def ping(self) -> None:
        self._client.ping()

    def publish(self, job_id: str, message: dict[str, Any]) -> None:
        key = PROGRESS_KEY_PREFIX + job_id
        pipe = self._client.pipeline(transaction=False)
        pipe.xadd(key, {"m": json.dumps(message)}, maxlen=PROGRESS_STREAM_MAXLEN, approximate=True)
        pipe.expire(key, PROGRESS_STREAM_TTL_S)
        try:
            pipe.execute()
        except self._errors as exc:
            self.outage.failed(exc)
            return
        self.outage.ok()

    def subscribe(self, job_id: str, *, after: int = 0) -> Subscription:
        return _RedisSubscription(self, job_id, after)

    def wake(self) -> None:
        try:
            self._client.publish(WAKEUP_CHANNEL, "1")
        except self._errors as exc:
            self.outage.failed(exc)
            return
        self.outage.ok()

    def wait_for_wake(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        try:
            with self._lock:
                if self._pubsub is None:
                    self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                    self._pubsub.subscribe(WAKEUP_CHANNEL)
                pubsub = self._pubsub
            while (remaining := deadline - time.monotonic()) > 0:
                if pubsub.get_message(timeout=remaining) is not None:
                    self.outage.ok()
                    return True
        except self._errors as exc:
            self.outage.failed(exc)
            self._drop_pubsub()
            time.sleep(max(0.0, deadline - time.monotonic()))  # a wait, not a busy loop
            return False
        self.outage.ok()
        return False

    def _drop_pubsub(self) -> None:
        """Forget a broken pub/sub connection: the next wait subscribes afresh."""
        with self._lock:
            pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(*self._errors):
                pubsub.close()

    def close(self) -> None:
        if self._pubsub is not None:
            self._pubsub.close()
        self._client.close()


def make_bus(redis_url: str | None) -> ProgressBus:
    """RedisBus when a URL is configured, else the in-process bus."""
    return RedisBus(redis_url) if redis_url else InProcessBus()
