"""Per-client rate limiting: a token bucket per client id, per process.

With N processes the effective limit is N times the setting; a shared limiter (Redis, the proxy)
is the production answer and is documented in docs/deployment.md.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(max(per_minute, 1))
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> float:
        """0 when the request may go ahead, else the seconds to wait (for Retry-After)."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return max(1.0, math.ceil((1 - tokens) / self.rate))


class FailureLimiter:
    """Failed sign-ins (token endpoint, browser sign-in) per key, in a sliding window.

    After ``max_failures`` failures within ``window_seconds`` the key is refused (429, with the
    seconds until its oldest failure leaves the window) without checking the credentials at all,
    so guessing a secret costs an attacker the window per few tries. Only failures count: a
    client that signs in correctly is never slowed. Keys are (remote address, presented client
    id), so one source guessing one client's secret is held up without locking that client out
    from everywhere. Per process like ``RateLimiter``; at most ``max_keys`` keys are tracked
    (the least recently failed are dropped first), so memory stays bounded under a spray.
    """

    def __init__(
        self,
        max_failures: int,
        window_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self.clock = clock
        self.max_keys = max_keys
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, ()) if now - t < self.window]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    def wait(self, key: str) -> float:
        """0 when ``key`` may try, else the seconds until it may (for Retry-After)."""
        if self.max_failures <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            times = self._recent(key, now)
            if len(times) < self.max_failures:
                return 0.0
            return max(1.0, math.ceil(times[-self.max_failures] + self.window - now))

    def failed(self, key: str) -> None:
        if self.max_failures <= 0:
            return
        now = self.clock()
        with self._lock:
            times = self._recent(key, now)
            times.append(now)
            self._failures.pop(key, None)  # re-insert: dict order = least recently failed first
            self._failures[key] = times[-self.max_failures :]
            while len(self._failures) > self.max_keys:
                del self._failures[next(iter(self._failures))]
