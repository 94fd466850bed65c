"""How many server-sent event streams each API key holds open: a slot per stream, at most `limit` per key.

With Redis the slots of all API replicas are one sorted set per key (member: the stream, score: when its lease
runs out), taken and freed by atomic scripts; a stream renews its lease while it runs, so the slots of a replica
that died free themselves once their leases expire. Without Redis (embedded mode) the count is this process's.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from typing import Protocol

import redis

from core.errors import TooManyRequests


logger = logging.getLogger(__name__)

LEASE_S = 60.0  # a slot not renewed for this long is free again (its replica is gone)
RETRY_AFTER_S = 5


class StreamSlots(Protocol):
    """Open-stream slots per key."""

    def acquire(self, key_id: uuid.UUID) -> str:
        """Takes a slot of `key_id` and returns its token, or raises `TooManyRequests` (`too_many_streams`)."""

    def renew(self, key_id: uuid.UUID, token: str) -> None:
        """Keeps the slot taken (a stream calls it at least every `LEASE_S / 2`)."""

    def release(self, key_id: uuid.UUID, token: str) -> None:
        """Frees the slot."""


def _too_many(limit: int) -> TooManyRequests:
    return TooManyRequests(
        f"this API key already has {limit} event streams open; close one or poll the events as JSON",
        retry_after_s=RETRY_AFTER_S,
        code="too_many_streams",
    )


class InProcessStreamSlots:
    """Slots counted in this process (embedded mode has one API process)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[uuid.UUID] = Counter()
        self._lock = threading.Lock()

    def acquire(self, key_id: uuid.UUID) -> str:
        """Takes a slot, or raises when the key has `limit` open."""
        with self._lock:
            if self._open[key_id] >= self.limit:
                raise _too_many(self.limit)
            self._open[key_id] += 1
        return uuid.uuid4().hex

    def renew(self, key_id: uuid.UUID, token: str) -> None:
        """Nothing to renew: the process holds its own count."""

    def release(self, key_id: uuid.UUID, token: str) -> None:
        """Frees one slot of the key."""
        with self._lock:
            self._open[key_id] -= 1
            if self._open[key_id] <= 0:
                del self._open[key_id]


# KEYS[1]: the key's set; ARGV: limit, token, lease seconds. Drops expired slots, then takes one if there is room.
ACQUIRE = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 1)
return 1
"""
# KEYS[1]: the key's set; ARGV: token, lease seconds. Extends the slot's lease if it is still held.
RENEW = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
end
return 1
"""


class RedisStreamSlots:
    """Slots shared by every API replica. If Redis does not answer, a stream is let through (logged)."""

    def __init__(
        self, client: redis.Redis, limit: int, *, lease_s: float = LEASE_S, prefix: str = "dopsd:streams:"
    ) -> None:
        self.client, self.limit, self.lease_s, self.prefix = client, limit, lease_s, prefix
        self._acquire = client.register_script(ACQUIRE)
        self._renew = client.register_script(RENEW)

    def acquire(self, key_id: uuid.UUID) -> str:
        """Takes a slot in the key's shared set, or raises when `limit` unexpired slots are taken."""
        token = uuid.uuid4().hex
        try:
            taken = self._acquire(keys=[f"{self.prefix}{key_id}"], args=[self.limit, token, self.lease_s])
        except redis.RedisError as exc:
            logger.warning("stream limit not applied, Redis unavailable: %s", type(exc).__name__)
            return token
        if not int(taken):
            raise _too_many(self.limit)
        return token

    def renew(self, key_id: uuid.UUID, token: str) -> None:
        """Extends the slot's lease."""
        try:
            self._renew(keys=[f"{self.prefix}{key_id}"], args=[token, self.lease_s])
        except redis.RedisError as exc:
            logger.warning("stream slot not renewed, Redis unavailable: %s", type(exc).__name__)

    def release(self, key_id: uuid.UUID, token: str) -> None:
        """Frees the slot (its lease would free it anyway)."""
        try:
            self.client.zrem(f"{self.prefix}{key_id}", token)
        except redis.RedisError as exc:
            logger.warning("stream slot not released, Redis unavailable: %s", type(exc).__name__)


def make_stream_slots(limit: int, client: redis.Redis | None) -> StreamSlots:
    """Shared slots when a Redis client is given, else this process's."""
    return RedisStreamSlots(client, limit) if client is not None else InProcessStreamSlots(limit)
