"""Per-tenant request rate limits (a token bucket per tenant) and the short-lived cache of
authenticated credentials that spares each request its auth query.

Both live in the API process: with `mixloom api --workers N` each process has its own
buckets (a tenant may send up to N times the rate in all) and its own cache.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mixloom.errors import QuotaExceededError
from mixloom.server.errors import error_response
from mixloom.storage.records import TenantRecord

_MAX_TENANTS = 100_000  # buckets kept; past it the full (idle) ones are dropped
_MAX_CACHED = 10_000  # credentials cached; past it the cache starts over


class RateLimitedError(QuotaExceededError):
    """A tenant sent requests faster than its rate; `retry_after` in seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, code="rate_limit_exceeded")
        self.retry_after = retry_after


class RateLimiter:
    """A token bucket per tenant: `burst` requests at once, refilled at `rate` a second.
    rate <= 0 turns it off."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, tenant_id: str) -> None:
        """Spend one request of the tenant's bucket; RateLimitedError if it is empty."""
        if self.rate <= 0:
            return
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(tenant_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1:
                if len(self._buckets) >= _MAX_TENANTS and tenant_id not in self._buckets:
                    self._prune(now)
                self._buckets[tenant_id] = (tokens - 1, now)
                return
            self._buckets[tenant_id] = (tokens, now)
        wait = (1 - tokens) / self.rate
        raise RateLimitedError(
            f"too many requests: this tenant may send {self.rate:g} a second (bursts of "
            f"{self.burst}); retry after {math.ceil(wait)} s, or ask an admin for a higher "
            "rate_limit_per_second",
            retry_after=wait,
        )

    def _prune(self, now: float) -> None:
        full = [
            t
            for t, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.burst
        ]
        for t in full:
            del self._buckets[t]


class AuthCache:
    """Credentials that authenticated in the last `ttl` seconds, keyed by a hash of the
    secret: a revoked key keeps working in this process for at most `ttl` s. Only successes
    are stored (unknown keys are random; storing them would only fill the cache)."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[str, tuple[float, TenantRecord]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(kind: str, secret: str) -> str:
        return kind + ":" + hashlib.sha256(secret.encode()).hexdigest()

    def lookup(self, kind: str, secret: str) -> TenantRecord | None:
        if self.ttl <= 0:
            return None
        hit = self._entries.get(self._key(kind, secret))
        return hit[1] if hit is not None and hit[0] > self._clock() else None

    def forget(self, kind: str, secret: str) -> None:
        """Drop a credential ended in this process (a dashboard sign-out), so that it stops
        at once rather than within `ttl`."""
        with self._lock:
            self._entries.pop(self._key(kind, secret), None)

    def store(self, kind: str, secret: str, tenant: TenantRecord) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= _MAX_CACHED:
                self._entries.clear()
            self._entries[self._key(kind, secret)] = (self._clock() + self.ttl, tenant)


def _rate_limited(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RateLimitedError)
    return error_response(
        429,
        exc.message,
        code=exc.code,
        headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
    )


def install_rate_limit_errors(app: FastAPI) -> None:
    """429 with Retry-After (whole seconds, at least 1) for RateLimitedError."""
    app.add_exception_handler(RateLimitedError, _rate_limited)
