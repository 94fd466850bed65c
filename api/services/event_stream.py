"""The live event stream of a job as server-sent events: the event log polled with short sessions (no
transaction held open for the stream's lifetime), resumable with `Last-Event-ID`, ended once the job is finished
and every event was sent."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from api.public_events import EventPublic
from api.services.present import event_public
from core.jobs import client_side
from core.jobs.models import Job
from core.storage import ArtifactStore


POLL_S = 0.5
KEEP_ALIVE_S = 15.0


def resume_point(after: int, last_event_id: str | None) -> int:
    """Where a stream starts: after the `Last-Event-ID` a reconnecting client sends, else after `after`."""
    if last_event_id and re.fullmatch(r"[0-9]{1,18}", last_event_id):
        return int(last_event_id)
    return after


async def event_stream(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    after: int,
    store: ArtifactStore,
    ttl_s: int,
    is_disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[str]:
    """Server-sent events of the job after event `after`, with a keep-alive comment while nothing happens."""
    idle = 0.0
    while not await is_disconnected():

        def poll(cursor: int) -> tuple[list[EventPublic], bool]:
            with sessions() as s:
                found = client_side.list_events(session=s, job_id=job_id, after=cursor, limit=200)
                events = [event_public(e, store, ttl_s) for e in found]
                job = s.get(Job, job_id)
                done = job is None or job.deleted or job.job_status.is_terminal
                return events, done

        events, done = await run_in_threadpool(poll, after)
        for e in events:
            after = e.id
            yield f"id: {e.id}\nevent: {e.type}\ndata: {json.dumps(e.model_dump(mode='json'))}\n\n"
        if done and not events:
            return
        if events:
            idle = 0.0
        else:
            idle += POLL_S
            if idle >= KEEP_ALIVE_S:
                idle = 0.0
                yield ": keep-alive\n\n"
        await asyncio.sleep(POLL_S)
