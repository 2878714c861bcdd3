"""Logging a service outage (Redis, the database) without flooding: a line when calls
start failing, one every `interval` s while they go on failing, one when a call succeeds
again. A Redis outage of 44 s once logged 3,300 tracebacks, one per failed call; a
5 s database restart logged 24,000 lines in the API."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

OUTAGE_LOG_INTERVAL_S = 60.0  # while a service is down, a log line this often


class Outage:
    """The state of one service as its callers see it. `what` names it ("progress bus:
    Redis"); `meanwhile` says what happens while it is down."""

    def __init__(
        self,
        what: str,
        *,
        meanwhile: str,
        logger: logging.Logger,
        interval: float = OUTAGE_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.meanwhile = meanwhile
        self.log = logger
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self.since: float | None = None  # when the outage began; None: the service answers
        self._failures = 0
        self._logged_at = 0.0

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            now = self._clock()
            self._failures += 1
            if self.since is None:
                self.since = self._logged_at = now
                self.log.warning(
                    "%s is unreachable (%s); %s", self.what, _first_line(exc), self.meanwhile
                )
            elif now - self._logged_at >= self.interval:
                self._logged_at = now
                self.log.warning(
                    "%s still unreachable after %.0f s (%d failed calls; last: %s)",
                    self.what,
                    now - self.since,
                    self._failures,
                    _first_line(exc),
                )

    def ok(self) -> None:
        if self.since is None:  # the common case, without the lock
            return
        with self._lock:
            if self.since is None:
                return
            self.log.warning(
                "%s is back after %.0f s (%d failed calls)",
                self.what,
                self._clock() - self.since,
                self._failures,
            )
            self.since, self._failures = None, 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
