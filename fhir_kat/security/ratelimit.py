"""Per-client rate limiting (a token bucket per client id) and failed sign-in limiting, per
process.

With N processes the effective limit is N times the setting; a shared limiter (Redis, the proxy)
is the production answer and is documented in docs/deployment.md.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable

log = logging.getLogger("fhir_kat.auth")


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


class _FailureWindows:
    """Failure times per key in a sliding window, in bounded memory.

    When more than ``max_keys`` keys are tracked, keys whose failures all left the window go
    first, then keys that are *not* limited, fewest failures first (losing them forgets the
    least). A limited key is never dropped to make room: when every tracked key is limited the
    new key is not tracked (and a warning is logged), so a spray of new keys can never buy a
    limited one a fresh budget."""

    def __init__(self, limit: int, window: float, max_keys: int) -> None:
        self.limit, self.window, self.max_keys = limit, window, max_keys
        self.failures: dict[str, list[float]] = {}
        self._warned_at: float | None = None

    def recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self.failures.get(key, ()) if now - t < self.window]
        if times:
            self.failures[key] = times
        else:
            self.failures.pop(key, None)
        return times

    def wait(self, key: str, now: float) -> float:
        if self.limit <= 0:
            return 0.0
        times = self.recent(key, now)
        if len(times) < self.limit:
            return 0.0
        return max(1.0, math.ceil(times[-self.limit] + self.window - now))

    def add(self, key: str, now: float) -> None:
        if self.limit <= 0:
            return
        times = self.recent(key, now)
        if not times and len(self.failures) >= self.max_keys and not self._make_room(now):
            if self._warned_at is None or now - self._warned_at >= 60:  # once a minute at most
                self._warned_at = now
                log.warning("failed sign-in limiter full of limited sources; new ones untracked")
            return
        times.append(now)
        self.failures.pop(key, None)  # re-insert: dict order = least recently failed first
        self.failures[key] = times[-self.limit :]

    def _make_room(self, now: float) -> bool:
        """Drop expired keys, then unlimited ones, down to 90 % of ``max_keys`` (amortised:
        one pass per tenth of the table, not per failure). False: every key is limited."""
        for key in [k for k, times in self.failures.items() if now - times[-1] >= self.window]:
            del self.failures[key]
        target = max(self.max_keys * 9 // 10, 0)
        if len(self.failures) <= target:
            return True
        unlimited = [
            (len(times), order, key)
            for order, (key, times) in enumerate(self.failures.items())
            if len([t for t in times if now - t < self.window]) < self.limit
        ]
        unlimited.sort()
        for _, _, key in unlimited[: len(self.failures) - target]:
            del self.failures[key]
        return len(self.failures) < self.max_keys


def source_of(address: str | None) -> str:
    """The source a failure is counted against: the IPv4 address, or the IPv6 /64 (one host
    usually holds a whole /64, so counting single IPv6 addresses would give it 2^64 budgets)."""
    text = (address or "").split("%", 1)[0]
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return text[:64]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


class FailureLimiter:
    """Failed sign-ins (token endpoint, browser sign-in), in sliding windows.

    Two budgets, both of which must hold: ``max_failures`` per (source, presented client id),
    so one source guessing one client's secret is held up without locking that client out from
    everywhere; and ``source_failures`` per source whatever client ids it presents, so spraying
    many client ids (to enumerate them, or to push the first key out of memory) is held up as
    well. A source is an IPv4 address or an IPv6 /64 (``source_of``). Once a budget is spent the
    source is refused (429, with the seconds until its oldest counted failure leaves the window)
    without checking the credentials at all. Only failures count: a client that signs in
    correctly is never slowed. Per process like ``RateLimiter``; memory is bounded by
    ``max_keys`` per budget and never frees a limited key (``_FailureWindows``).
    """

    def __init__(
        self,
        max_failures: int,
        window_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 50_000,
        source_failures: int | None = None,
    ) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self.clock = clock
        per_source = 5 * max_failures if source_failures is None else source_failures
        self._pairs = _FailureWindows(max_failures, window_seconds, max_keys)
        self._sources = _FailureWindows(
            per_source if max_failures > 0 else 0, window_seconds, max_keys
        )
        self._lock = threading.Lock()

    @staticmethod
    def _pair(source: str, client_id: str) -> str:
        return f"{source}\x1f{client_id[:128]}"

    def wait(self, address: str | None, client_id: str) -> float:
        """0 when this source may try this client id, else the seconds until it may."""
        source = source_of(address)
        now = self.clock()
        with self._lock:
            return max(
                self._pairs.wait(self._pair(source, client_id), now),
                self._sources.wait(source, now),
            )

    def failed(self, address: str | None, client_id: str) -> None:
        source = source_of(address)
        now = self.clock()
        with self._lock:
            self._pairs.add(self._pair(source, client_id), now)
            self._sources.add(source, now)
