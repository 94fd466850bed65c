"""The per-key limits of uploads, so that what one key sends costs only that key: how many of its uploads may
stream at once (each holds temporary disk and a connection; one more waits a little, then is refused), and how many image pixels it may have checked per
minute. Jobs, dry runs and previews all count: each is decoded the same way.

Both live in the API process (as `api/ratelimit.py`'s buckets do): with several API replicas each enforces its
own share. They are made once per app, on first use, from the app's settings.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.requests import Request

from api.validation_pool import KeyedSerializer, ValidationPool, process_pool
from core.config import Settings
from core.errors import TooManyRequests


class ConcurrentUploads:
    """At most `limit` uploads of one key in flight in this process. One more waits up to `wait_s` for a slot
    before its body is read (a client that sends a few at once is served in turn), then is refused."""

    def __init__(self, limit: int, wait_s: float) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self._slots: dict[uuid.UUID, asyncio.Semaphore] = {}
        self._users: dict[uuid.UUID, int] = {}

    @asynccontextmanager
    async def slot(self, key_id: uuid.UUID) -> AsyncIterator[None]:
        """Holds one of the key's upload slots for the block; raises `too_many_uploads` (429) when none is free
        within `wait_s`."""
        semaphore = self._slots.setdefault(key_id, asyncio.Semaphore(self.limit))
        self._users[key_id] = self._users.get(key_id, 0) + 1
        try:
            try:
                await asyncio.wait_for(semaphore.acquire(), timeout=self.wait_s)
            except TimeoutError:
                raise TooManyRequests(
                    f"this key already has {self.limit} uploads in progress; wait for one to finish",
                    retry_after_s=1,
                    code="too_many_uploads",
                ) from None
            try:
                yield
            finally:
                semaphore.release()
        finally:
            self._users[key_id] -= 1
            if not self._users[key_id]:
                del self._users[key_id], self._slots[key_id]


class PixelBudget:
    """A token bucket per key of image pixels checked per minute (bursts up to one minute's worth)."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[uuid.UUID, tuple[float, float]] = {}

    def charge(self, key_id: uuid.UUID, pixels: int) -> None:
        """Takes `pixels` from the key's bucket, or raises `upload_budget_exceeded` (429) with the seconds until
        enough is back. A request larger than the whole budget waits for a full bucket (the per-request limit
        keeps it smaller than that by default)."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        needed = min(float(pixels), self.capacity)
        if tokens < needed:
            self._buckets[key_id] = (tokens, now)
            retry = max(1, math.ceil((needed - tokens) / self.rate))
            raise TooManyRequests(
                f"this key had {int(self.capacity)} image pixels checked in the last minute (jobs, dry runs and "
                f"previews count); this request has {pixels}",
                retry_after_s=retry,
                code="upload_budget_exceeded",
            )
        self._buckets[key_id] = (tokens - float(pixels), now)


@dataclass
class UploadGuards:
    """The upload limits of one app and the pool its checks run in."""

    uploads: ConcurrentUploads
    pixels: PixelBudget
    pool: ValidationPool
    checks: KeyedSerializer = field(default_factory=KeyedSerializer)

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadGuards:
        """The guards `settings` describe; the pool is this process's one of `validation_workers` processes."""
        return cls(
            uploads=ConcurrentUploads(settings.max_uploads_per_key, settings.upload_slot_wait_s),
            pixels=PixelBudget(settings.upload_pixels_per_minute),
            pool=process_pool(settings.validation_workers),
        )


def upload_guards(request: Request, settings: Settings) -> UploadGuards:
    """The app's guards, made on first use (only the event loop's thread calls this: no race)."""
    guards: UploadGuards | None = getattr(request.app.state, "upload_guards", None)
    if guards is None:
        guards = UploadGuards.from_settings(settings)
        request.app.state.upload_guards = guards
    return guards
