"""Per-client token buckets: issuance requests, and failed authentications.

State is per worker process (the kernel spreads connections over workers), so the effective
limit for one client is up to `workers` times the configured rate; the docs say so.
"""

from __future__ import annotations

import time
from collections import OrderedDict

MAX_CLIENTS = 65536


class TokenBuckets:
    def __init__(self, per_second: float, burst: float) -> None:
        self.per_second = per_second
        self.burst = max(burst, 1.0)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def _level(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.per_second)

    def retry_after(self, key: str) -> float:
        """0 when `key` may proceed now, else seconds until a token is there (does not take)."""
        if not self.enabled:
            return 0.0
        level = self._level(key, time.monotonic())
        return 0.0 if level >= 1 else (1 - level) / self.per_second

    def take(self, key: str) -> float:
        """Take a token; return 0 on success, else the seconds to wait (nothing taken)."""
        if not self.enabled:
            return 0.0
        now = time.monotonic()
        level = self._level(key, now)
        if level < 1:
            self._buckets[key] = (level, now)
            return (1 - level) / self.per_second
        self._buckets[key] = (level - 1, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return 0.0
