"""The live event stream of a job as server-sent events: the event log polled with short sessions (no
transaction held open for the stream's lifetime), resumable with `Last-Event-ID`, ended once the job is finished
and every event was sent.

Each poll takes one of the API's database slots for its session (`api.database`), as a request does. Streams are
bounded: each holds one of its key's stream slots (`api.stream_slots`, at most `DOPSD_MAX_STREAMS_PER_KEY`
over all replicas), ends when its key is revoked, and ends after `DOPSD_STREAM_MAX_S`, when the client reconnects
with `Last-Event-ID` and loses nothing."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from api.database import Database
from api.public_events import EventPublic
from api.services.present import event_public
from api.stream_slots import LEASE_S, StreamSlots
from core.jobs import client_side
from core.jobs.models import ApiKey, Job
from core.storage import ArtifactStore


POLL_S = 0.5
LIFETIME_COMMENT = ": the stream's lifetime is over; reconnect with Last-Event-ID"
KEEP_ALIVE_S = 15.0


@dataclass(frozen=True)
class StreamBounds:
    """What bounds one stream: the key it runs for and the slot it holds, and how long it may last."""

    key_id: uuid.UUID
    slots: StreamSlots
    slot: str
    max_s: float


def resume_point(after: int, last_event_id: str | None) -> int:
    """Where a stream starts: after the `Last-Event-ID` a reconnecting client sends, else after `after`."""
    if last_event_id and re.fullmatch(r"[0-9]{1,18}", last_event_id):
        return int(last_event_id)
    return after


async def event_stream(
    database: Database,
    job_id: uuid.UUID,
    after: int,
    store: ArtifactStore,
    ttl_s: int,
    is_disconnected: Callable[[], Awaitable[bool]],
    bounds: StreamBounds,
) -> AsyncIterator[str]:
    """Server-sent events of the job after event `after`, with a keep-alive comment while nothing happens; ends
    when the job is finished and sent, the key is revoked or the stream's lifetime is over. Frees its slot."""
    started = time.monotonic()
    renewed = started
    try:
        idle = 0.0
        while not await is_disconnected():
            if time.monotonic() - renewed >= LEASE_S / 3:
                await run_in_threadpool(bounds.slots.renew, bounds.key_id, bounds.slot)
                renewed = time.monotonic()

            def poll(s: Session, cursor: int = after) -> tuple[list[EventPublic], bool, bool]:
                found = client_side.list_events(session=s, job_id=job_id, after=cursor, limit=200)
                job = s.get(Job, job_id)
                # The key is read after the events: an event written once the key was revoked (revocation cancels
                # the key's jobs) is never sent.
                key = s.get(ApiKey, bounds.key_id)
                if key is None or key.revoked_at is not None:
                    return [], False, True
                events = [event_public(e, store, ttl_s) for e in found]
                done = job is None or job.deleted or job.job_status.is_terminal
                return events, done, False

            # Each poll is a short session in one of the API's database slots, like a request's (api.database).
            events, done, revoked = await database.run(poll)
            if revoked:
                return
            for e in events:
                after = e.id
                yield f"id: {e.id}\nevent: {e.type}\ndata: {json.dumps(e.model_dump(mode='json'))}\n\n"
            if done and not events:
                return
            if time.monotonic() - started >= bounds.max_s:
                # A planned end, said so: the client reconnects with Last-Event-ID (nothing is lost) and does not
                # count it as a failure.
                yield f"{LIFETIME_COMMENT}\n\n"
                return
            if events:
                idle = 0.0
            else:
                idle += POLL_S
                if idle >= KEEP_ALIVE_S:
                    idle = 0.0
                    yield ": keep-alive\n\n"
            await asyncio.sleep(POLL_S)
    finally:
        with anyio.CancelScope(shield=True):  # also when the client went away and the stream is cancelled
            await run_in_threadpool(bounds.slots.release, bounds.key_id, bounds.slot)
