"""The keys an API process has authenticated, kept in memory for a few seconds so that a client polling its jobs
costs no key lookup in the database, and never accepted once revoked.

An entry is (the key's record, the key revocation counter read before the record was). Each request reads the
counter again with its rate limit (one Redis call, `api.ratelimit`); an entry is used only while the counter has
not moved and it is younger than `core.api_keys.CACHE_S`. A revocation commits, then increments the counter
(`core.api_keys.announce_revocation`), so once the revoking command has returned, every request of every replica
either reads the counter moved and looks the key up again, finding it revoked, or is served from an entry read
after the revocation, which holds no such key. Without Redis (embedded mode: one process, and the CLI revokes in
another) nothing is kept and every request looks its key up.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis
from sqlalchemy.orm import Session

from api.ratelimit import RateLimiter
from core import api_keys
from core.jobs.models import ApiKey
from core.security import hash_api_key


MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class _Entry:
    key: ApiKey  # detached from every session: only its loaded columns are read
    revocations: int
    at: float


class Principals:
    """Authenticates presented keys and takes each request from its key's rate limit, keeping authenticated keys
    as described above when `client` (the shared Redis) is given."""

    def __init__(self, limiter: RateLimiter, client: redis.Redis | None, ttl_s: float = api_keys.CACHE_S) -> None:
        self.limiter, self.client, self.ttl_s = limiter, client, ttl_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def authenticate(self, session: Session, presented: str) -> ApiKey:
        """The active key `presented` names, within its request rate; `Unauthorized` or `TooManyRequests`
        otherwise. Looks the key up in `session` unless a valid entry has it."""
        digest = hash_api_key(presented)
        with self._lock:
            entry = self._entries.get(digest)
        if entry is not None and time.monotonic() - entry.at < self.ttl_s:
            revocations = self.limiter.check(entry.key.id)
            if revocations is not None and revocations == entry.revocations:
                return entry.key
            return self._look_up(session, presented, digest)  # a key was revoked since: read it again
        key = self._look_up(session, presented, digest)
        self.limiter.check(key.id)
        return key

    def _look_up(self, session: Session, presented: str, digest: str) -> ApiKey:
        revocations = self._revocations()  # read before the key: a revocation after the read moves it
        try:
            key = api_keys.authenticate(session=session, key=presented)
        except Exception:
            with self._lock:
                self._entries.pop(digest, None)
            raise
        session.expunge(key)  # the entry outlives the session; nothing may expire or refresh it
        if revocations is not None:
            with self._lock:
                self._entries[digest] = _Entry(key, revocations, time.monotonic())
                self._entries.move_to_end(digest)
                while len(self._entries) > MAX_ENTRIES:
                    self._entries.popitem(last=False)
        return key

    def _revocations(self) -> int | None:
        """The revocation counter now, or None (no Redis, or it does not answer: then nothing is kept)."""
        if self.client is None:
            return None
        try:
            value = self.client.get(api_keys.REVOCATIONS_KEY)
        except redis.RedisError:
            return None
        return int(value) if value is not None else 0
