"""Per-key request rate limiting: a token bucket per API key, shared by every API replica through Redis when one
is configured (one atomic Lua script per request), else kept in this process (embedded mode).

The same Redis call reads the key revocation counter (`core.api_keys.REVOCATIONS_KEY`), which lets an API process
keep the keys it authenticated for a few seconds (`api.principals`) without a revocation ever being missed."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from typing import Protocol

import redis

from core.api_keys import REVOCATIONS_KEY
from core.errors import TooManyRequests


logger = logging.getLogger(__name__)


class RateLimiter(Protocol):
    """Takes one request from a key's allowance, or raises `TooManyRequests` with the seconds to wait."""

    def check(self, key_id: uuid.UUID) -> int | None:
        """One request of `key_id`; returns the key revocation counter read at the same time, or None where there
        is none to read (in process, or Redis not answering)."""


def _refused(tokens: float, rate: float) -> TooManyRequests:
    retry = max(1, math.ceil((1.0 - tokens) / rate))
    return TooManyRequests("too many requests for this API key", retry_after_s=retry)


class InProcessRateLimiter:
    """`per_minute` requests per key, with bursts up to the same number, counted in this process only."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[uuid.UUID, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key_id: uuid.UUID) -> None:
        """Takes one token from the key's bucket, or raises with the seconds until one is back (no revocation
        counter: returns None)."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now)
                raise _refused(tokens, self.rate)
            self._buckets[key_id] = (tokens - 1.0, now)


# The bucket as a hash {tokens, ts}; Redis' own clock, so replicas on different hosts agree. KEYS[2]: the key
# revocation counter. Returns {allowed, tokens left as a string (a Lua number would be truncated to an integer),
# the revocation counter (0 when never set)}.
TOKEN_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
return {allowed, tostring(tokens), tonumber(redis.call('GET', KEYS[2]) or '0')}
"""


class RedisRateLimiter:
    """The same token bucket as `InProcessRateLimiter`, held in Redis so that every API replica draws from one
    bucket per key. If Redis does not answer, requests are let through (logged): the limiter is not worth an
    outage of the API."""

    def __init__(self, client: redis.Redis, per_minute: int, prefix: str = "dopsd:ratelimit:") -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.prefix = prefix
        self._script = client.register_script(TOKEN_BUCKET)

    def check(self, key_id: uuid.UUID) -> int | None:
        """Takes one token from the key's shared bucket, or raises with the seconds until one is back; returns the
        revocation counter (None if Redis did not answer)."""
        try:
            allowed, tokens, revocations = self._script(
                keys=[f"{self.prefix}{key_id}", REVOCATIONS_KEY], args=[self.capacity, self.rate]
            )
        except redis.RedisError as exc:
            logger.warning("rate limit not applied, Redis unavailable: %s", type(exc).__name__)
            return None
        if not int(allowed):
            raise _refused(float(tokens), self.rate)
        return int(revocations)


def make_rate_limiter(per_minute: int, client: redis.Redis | None) -> RateLimiter:
    """The shared limiter when a Redis client is given, else the in-process one."""
    return RedisRateLimiter(client, per_minute) if client is not None else InProcessRateLimiter(per_minute)
