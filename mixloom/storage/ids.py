"""Object ids that sort by creation time, so cursor pagination is a plain `id < after`."""

from __future__ import annotations

import secrets
import time

# 12 hex digits of milliseconds since the epoch last until the year 10889.
_TIME_HEX = 12
_RANDOM_BYTES = 6


def new_id(prefix: str) -> str:
    """e.g. `ftjob-0192f3a4b5c6d7e8f9a0b1c2`: time-ordered, then random."""
    millis = time.time_ns() // 1_000_000
    return f"{prefix}-{millis:0{_TIME_HEX}x}{secrets.token_hex(_RANDOM_BYTES)}"
