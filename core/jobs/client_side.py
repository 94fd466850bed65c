"""The client's side of jobs: creating, reading, listing (cursor pages), queue positions, cancelling, events.

Functions take a session and keyword arguments, raise `DomainError`s (never HTTP errors), and leave committing to
the caller.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from core.errors import Conflict, InvalidRequest, NotFound
from core.events import CanceledPayload, CancelRequestedPayload, EventType, QueuedPayload, add_event
from core.jobs.models import GENERATION, Job, JobEvent, utcnow
from core.jobs.states import JobStatus, Transition
from core.jobs.transitions import move


def create_job(
    *,
    session: Session,
    job_id: uuid.UUID,
    owner_id: uuid.UUID,
    preset: str,
    queue: str,
    spec: dict[str, Any],
    config: dict[str, Any],
    images: list[dict[str, Any]],
    kind: str = "training",
    webhook_url: str | None = None,
    webhook_events: list[str] | None = None,
) -> Job:
    """Records a queued job (the caller commits, then enqueues)."""
    job = Job(
        id=job_id,
        kind=kind,
        webhook_url=webhook_url,
        webhook_events=webhook_events,
        owner_id=owner_id,
        preset=preset,
        queue=queue,
        spec=spec,
        config=config,
        images=images,
        stored_bytes=sum(int(image["size"]) for image in images),
        status=JobStatus.QUEUED.value,
        total_steps=int(config.get("max_train_steps") or 0),
        dispatched_at=utcnow(),  # the caller sends the message right after committing
    )
    session.add(job)
    session.flush()
    add_event(
        session=session,
        job_id=job.id,
        payload=QueuedPayload(images=len(images), position=queue_position(session=session, job=job)),
    )
    return job


def get_job(*, session: Session, owner_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The caller's job; another key's job, a deleted one and an unknown id all answer `NotFound`."""
    job = session.get(Job, job_id)
    if job is None or job.owner_id != owner_id or job.deleted:
        raise NotFound(f"job {job_id} not found", code="job_not_found")
    return job


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), str(job.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, job_id = json.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except Exception as exc:  # anything a client can put in a cursor is its mistake, not ours
        raise InvalidRequest("`cursor` is not a cursor this API returned", code="invalid_cursor") from exc


def list_jobs(
    *,
    session: Session,
    owner_id: uuid.UUID,
    status: JobStatus | None,
    limit: int,
    cursor: str | None,
    kind: str = "training",
) -> tuple[list[Job], str | None]:
    """The caller's jobs of one kind, newest first, a page at a time (keyset pagination on (created_at, id))."""
    query = select(Job).where(Job.owner_id == owner_id, Job.deleted.is_(False), Job.kind == kind)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def queued_in(*, session: Session, queue: str) -> int:
    """How many jobs wait in a queue."""
    query = (
        select(func.count())
        .select_from(Job)
        .where(Job.queue == queue, Job.status == JobStatus.QUEUED, Job.deleted.is_(False))
    )
    return int(session.scalar(query) or 0)


def queue_position(*, session: Session, job: Job) -> int | None:
    """1 for the next job a worker of its queue takes; `None` when not queued."""
    if job.job_status != JobStatus.QUEUED:
        return None
    ahead = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.queue == job.queue,
            Job.status == JobStatus.QUEUED,
            Job.deleted.is_(False),
            or_(Job.created_at < job.created_at, and_(Job.created_at == job.created_at, Job.id < job.id)),
        )
    )
    return int(ahead or 0) + 1


def request_cancel(*, session: Session, job: Job) -> Job:
    """Cancels a queued job at once; asks the worker of a running one to stop (within one training step).

    The queued case is one conditional UPDATE, so a worker claiming the job at the same moment wins or loses
    cleanly: if it won, the job is running and gets a stop request instead.
    """
    if job.job_status == JobStatus.QUEUED:
        result = session.execute(move(Transition.CANCEL, Job.id == job.id))
        session.refresh(job)
        if result.rowcount:  # type: ignore[attr-defined]
            add_event(session=session, job_id=job.id, payload=CanceledPayload(while_="queued"))
            return job
    if job.job_status == JobStatus.RUNNING:
        if not job.cancel_requested:
            job.cancel_requested = True
            add_event(session=session, job_id=job.id, payload=CancelRequestedPayload())
    elif job.job_status != JobStatus.CANCELED:
        raise Conflict(f"job {job.id} already {job.status}", code="job_not_cancellable")
    return job


def mark_deleted(*, session: Session, job: Job) -> None:
    """Hides the job from its owner (404 from now on) and stops it: a queued job is canceled at once, a running
    one's worker stops within a step and then deletes what it stored. The caller has deleted the job's objects
    first (so a storage outage leaves the job visible, to be deleted again), commits, then deletes them once more:
    what a running worker uploaded in between goes then, and what it uploads later goes when it stops."""
    if not job.job_status.is_terminal:
        request_cancel(session=session, job=job)
    job.deleted = True
    job.deleted_at = utcnow()


def list_events(*, session: Session, job_id: uuid.UUID, after: int, limit: int) -> list[JobEvent]:
    """A job's events with id > `after`, oldest first."""
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)
    return list(session.scalars(query))


def latest_event(*, session: Session, job_id: uuid.UUID, type: EventType) -> JobEvent | None:
    """The job's newest event of one type (a preview's images are in its last `sample` event)."""
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == type).order_by(JobEvent.id.desc())
    return session.scalars(query.limit(1)).first()


def count_queued(*, session: Session, owner_id: uuid.UUID, generations: bool = False) -> int:
    """How many of a key's jobs wait in the queue: its training jobs and previews, or (`generations`) its
    generations, which have limits of their own."""
    kind = Job.kind == GENERATION if generations else Job.kind != GENERATION
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner_id == owner_id, Job.status == JobStatus.QUEUED, Job.deleted.is_(False), kind)
        )
        or 0
    )
