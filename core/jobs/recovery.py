"""Recovery, what the periodic reaper does: jobs of dead workers, lost messages, retention, and the sweep of deleted
jobs (their leftover objects, then their personal data once the grace period is over)."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from core.events import CanceledPayload, FailedPayload, PurgedPayload, RequeuedPayload, add_event
from core.jobs.models import IdempotencyRecord, Job, JobArtifact, JobEvent, WebhookDelivery, utcnow
from core.jobs.states import TERMINAL, JobStatus, Transition
from core.jobs.transitions import move


def reap(
    *, session: Session, max_attempts: int, dispatch_grace_s: float, idempotency_ttl_s: int
) -> list[tuple[uuid.UUID, str]]:
    """Recovers jobs from dead workers and lost messages; returns (job id, queue) pairs to dispatch again.

    - A running job whose lease ran out (its worker died) goes back to `queued`, or fails with
      `too_many_attempts` once it has been started `max_attempts` times.
    - A queued job whose last message is older than `dispatch_grace_s` (the broker lost it, or its key was at its
      running limit) is offered again; duplicates are harmless because claims are conditional.
    Every change is a conditional UPDATE, so several reapers may run at once. The caller commits, then sends.
    """
    now = utcnow()
    expired = Job.lease_expires_at < now
    failed = session.execute(
        move(Transition.EXHAUST, expired, Job.attempt >= max_attempts, now=now)
        .values(
            error_code="too_many_attempts",
            error_message=f"the job was started {max_attempts} times without finishing",
        )
        .returning(Job.id)
    ).scalars()
    for job_id in list(failed):
        add_event(session=session, job_id=job_id, payload=FailedPayload(code="too_many_attempts"))
    stopped = session.execute(
        move(
            Transition.ABANDON, expired, or_(Job.deleted.is_(True), Job.cancel_requested.is_(True)), now=now
        ).returning(Job.id)
    ).scalars()
    for job_id in list(stopped):
        add_event(session=session, job_id=job_id, payload=CanceledPayload(while_="worker lost"))
    requeued = session.execute(
        move(Transition.REQUEUE, expired)
        .values(worker_id=None, lease_expires_at=None, dispatched_at=now)
        .returning(Job.id, Job.queue, Job.attempt)
    ).all()
    for job_id, _, attempt in requeued:
        add_event(session=session, job_id=job_id, payload=RequeuedPayload(after_attempt=attempt))
    stale = session.execute(
        update(Job)
        .where(
            Job.status == JobStatus.QUEUED,
            Job.deleted.is_(False),
            or_(Job.dispatched_at.is_(None), Job.dispatched_at < now - timedelta(seconds=dispatch_grace_s)),
        )
        .values(dispatched_at=now)
        .returning(Job.id, Job.queue)
    ).all()
    session.execute(
        delete(IdempotencyRecord).where(IdempotencyRecord.created_at < now - timedelta(seconds=idempotency_ttl_s))
    )
    return [(job_id, queue) for job_id, queue, _ in requeued] + [(job_id, queue) for job_id, queue in stale]


def jobs_past_retention(*, session: Session, older_than_days: float, limit: int = 100) -> list[uuid.UUID]:
    """Finished, not yet deleted jobs whose data is older than the retention period."""
    cutoff = utcnow() - timedelta(days=older_than_days)
    query = (
        select(Job.id)
        .where(Job.deleted.is_(False), Job.status.in_(sorted(TERMINAL)), Job.finished_at < cutoff)
        .limit(limit)
    )
    return list(session.scalars(query))


def purge_job(*, session: Session, job_id: uuid.UUID) -> None:
    """Marks a job whose stored objects were deleted by retention (it then answers 404, and its personal data is
    erased after the deletion grace period, as after `DELETE`)."""
    job = session.get_one(Job, job_id)
    now = utcnow()
    job.deleted, job.deleted_at, job.objects_deleted_at = True, now, now
    add_event(session=session, job_id=job_id, payload=PurgedPayload(reason="retention"))


def deleted_jobs_with_objects(*, session: Session, limit: int = 100) -> list[uuid.UUID]:
    """Deleted jobs whose worker has stopped (the job is in a final state) and whose prefix has not been found empty
    since: `DELETE` of a running job, a reaper's `ABANDON` of a deleted job whose worker was lost, a delete whose
    storage call failed, and jobs deleted before the sweep existed."""
    query = (
        select(Job.id)
        .where(Job.deleted.is_(True), Job.status.in_(sorted(TERMINAL)), Job.objects_deleted_at.is_(None))
        .order_by(Job.deleted_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def mark_objects_deleted(*, session: Session, job_id: uuid.UUID) -> None:
    """Records that a deleted job's prefix was emptied after its worker stopped."""
    session.execute(update(Job).where(Job.id == job_id).values(objects_deleted_at=utcnow()))


def jobs_to_erase(*, session: Session, grace_s: float, limit: int = 100) -> list[uuid.UUID]:
    """Deleted jobs past the grace period whose objects are gone and whose personal data is still stored."""
    cutoff = utcnow() - timedelta(seconds=grace_s)
    query = (
        select(Job.id)
        .where(
            Job.deleted.is_(True),
            Job.objects_deleted_at.is_not(None),
            Job.data_erased_at.is_(None),
            Job.deleted_at < cutoff,
        )
        .limit(limit)
    )
    return list(session.scalars(query))


def erase_job_data(*, session: Session, job_id: uuid.UUID) -> None:
    """Erases what a deleted job held of its owner: the spec and resolved config (captions, trigger, prompts), the
    image file names, the webhook URL, the error message and report (both may quote them), its events, artifacts,
    webhook deliveries and idempotency records. What stays is the accounting row: ids, kind, preset, status,
    timestamps, steps, GPU seconds and the error code."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            spec={},
            config={},
            images=[],
            webhook_url=None,
            webhook_events=None,
            error_message=None,
            report=None,
            data_erased_at=utcnow(),
        )
    )
    for table in (JobEvent, JobArtifact, WebhookDelivery, IdempotencyRecord):
        session.execute(delete(table).where(table.job_id == job_id))
