"""Per-key request rate limiting: a token bucket per API key, in this process."""

from __future__ import annotations

import math
import threading
import time
import uuid

from core.errors import TooManyRequests


class RateLimiter:
    """`per_minute` requests per key, with bursts up to the same number; over it, `TooManyRequests`.

    The buckets live in this API process: with several API replicas each enforces its own share.
    """

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[uuid.UUID, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key_id: uuid.UUID) -> None:
        """Takes one token from the key's bucket, or raises with the seconds until one is back."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now)
                retry = max(1, math.ceil((1.0 - tokens) / self.rate))
                raise TooManyRequests("too many requests for this API key", retry_after_s=retry)
            self._buckets[key_id] = (tokens - 1.0, now)
