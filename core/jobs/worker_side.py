"""The worker's side of jobs: claiming under a lease, renewing it, progress, and the three ways an attempt ends.

Every change is one conditional UPDATE, so a duplicate delivery, a dead worker's late write or a cancel racing a
finish cannot leave a job in two states. The caller commits, except `claim_job` (its own transaction).
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from core.events import (
    CanceledPayload,
    FailedPayload,
    ProgressPayload,
    StartedPayload,
    add_event,
    succeeded_payload,
)
from core.jobs.models import GENERATION, ApiKey, Job, JobArtifact, utcnow
from core.jobs.states import JobStatus, Transition
from core.jobs.transitions import move


def claim_job(
    *,
    session: Session,
    job_id: uuid.UUID,
    worker_id: str,
    lease_s: int,
    max_running_per_key: int = 1_000_000,
    generations: bool = False,
) -> int | None:
    """Takes a job for this worker in one conditional UPDATE, and commits; returns the attempt number.

    A queued job is taken; so is a running one whose lease ran out (its worker died and the broker delivered the
    message again). Anything else returns None: a duplicate delivery of a live or finished job does nothing, and a
    job whose key already runs `max_running_per_key` jobs stays queued (the reaper offers it again later). The
    running jobs counted are the key's training jobs and previews, or with `generations` its generations: the two
    have limits of their own, so a key's long training never holds its generations back.
    """
    owner_id = session.scalar(select(Job.owner_id).where(Job.id == job_id))
    if owner_id is None:
        session.commit()
        return None
    # Claims of one key's jobs take turns (a row lock on the key), so two workers cannot both see a free slot.
    session.execute(select(ApiKey.id).where(ApiKey.id == owner_id).with_for_update())
    now = utcnow()
    # Only running jobs hold a lease: a queued job has none, a running one is free once its lease ran out.
    free = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)
    other = aliased(Job)
    running_of_owner = (
        select(func.count())
        .select_from(other)
        .where(
            other.owner_id == Job.owner_id,
            other.status == JobStatus.RUNNING,
            other.id != Job.id,
            other.kind == GENERATION if generations else other.kind != GENERATION,
        )
        .scalar_subquery()
    )
    result = session.execute(
        move(Transition.CLAIM, Job.id == job_id, Job.deleted.is_(False), free, running_of_owner < max_running_per_key)
        .values(
            attempt=Job.attempt + 1,
            worker_id=worker_id,
            started_at=func.coalesce(Job.started_at, now),
            lease_expires_at=now + timedelta(seconds=lease_s),
        )
        .returning(Job.attempt)
    )
    attempt = result.scalar_one_or_none()
    if attempt is not None:
        add_event(session=session, job_id=job_id, payload=StartedPayload(worker=worker_id, attempt=attempt))
    session.commit()
    return attempt


def renew_lease(*, session: Session, job_id: uuid.UUID, worker_id: str, lease_s: int) -> bool:
    """Extends this worker's lease on a running job; False when the job is no longer this worker's."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def give_up_lease(*, session: Session, job_id: uuid.UUID, worker_id: str) -> bool:
    """Ends this worker's lease on a running job at once, as if the worker had died: the reaper's next pass puts it
    back in the queue (or fails it after its last attempt) and it resumes from its newest stored checkpoint. For a
    worker whose training processes died past their restarts; False when the job is no longer this worker's."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(lease_expires_at=utcnow() - timedelta(seconds=1))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def record_progress(
    *,
    session: Session,
    job_id: uuid.UUID,
    step: int,
    total_steps: int,
    loss: float,
    eta_s: float,
    learning_rate: float | None = None,
    elapsed_s: float | None = None,
) -> bool:
    """Writes progress and a `progress` event; returns whether a cancel was requested meanwhile."""
    session.execute(
        update(Job).where(Job.id == job_id).values(step=step, total_steps=total_steps, loss=loss, eta_s=eta_s)
    )
    add_event(
        session=session,
        job_id=job_id,
        payload=ProgressPayload(
            step=step,
            total_steps=total_steps,
            loss=loss,
            learning_rate=learning_rate,
            eta_s=round(eta_s, 1),
            elapsed_s=None if elapsed_s is None else round(elapsed_s, 2),
        ),
    )
    return cancel_requested(session=session, job_id=job_id)


def cancel_requested(*, session: Session, job_id: uuid.UUID) -> bool:
    """Whether the job's owner asked to stop it (or deleted it)."""
    row = session.execute(select(Job.cancel_requested, Job.deleted).where(Job.id == job_id)).one_or_none()
    return row is None or bool(row[0]) or bool(row[1])


def _held_by(job_id: uuid.UUID, worker_id: str) -> ColumnElement[bool]:
    """The row of a job whose current attempt is `worker_id`'s (the transition says which states it may be in)."""
    return and_(Job.id == job_id, Job.worker_id == worker_id)


def finish_job(
    *,
    session: Session,
    job_id: uuid.UUID,
    worker_id: str,
    artifacts: list[dict[str, Any]],
    metrics: dict[str, Any],
    gpu_seconds: float = 0.0,
    report: dict[str, Any] | None = None,
) -> bool:
    """Marks the job succeeded with its artifacts (and evaluation `report`), in one transaction (the caller
    commits).

    One conditional UPDATE: only the worker holding the job may finish it, and not once a cancel or delete was
    asked for. Returns False (and changes nothing) otherwise. `metrics` must be the fields of a training's or a
    preview's `succeeded` payload (checked before anything is written).
    """
    payload = succeeded_payload({"gpu_seconds": 0.0, **metrics})
    result = session.execute(
        move(Transition.SUCCEED, _held_by(job_id, worker_id), Job.deleted.is_(False), Job.cancel_requested.is_(False))
        .values(eta_s=0.0, gpu_seconds=_plus_gpu(gpu_seconds), report=report)
        .returning(Job.gpu_seconds)
    )
    total = result.scalar_one_or_none()
    if total is None:
        return False
    session.execute(delete(JobArtifact).where(JobArtifact.job_id == job_id))
    session.add_all(JobArtifact(job_id=job_id, **a) for a in artifacts)
    add_event(session=session, job_id=job_id, payload=payload.model_copy(update={"gpu_seconds": round(total, 3)}))
    return True


def _plus_gpu(seconds: float) -> Any:
    """`gpu_seconds + seconds`, as an SQL expression (the column starts NULL)."""
    return func.coalesce(Job.gpu_seconds, 0.0) + seconds


def fail_job(
    *,
    session: Session,
    job_id: uuid.UUID,
    code: str,
    message: str,
    worker_id: str,
    gpu_seconds: float = 0.0,
) -> bool:
    """Marks a job failed with a stable code and a readable message; a worker may fail only a job it holds."""
    values: dict[str, Any] = {"gpu_seconds": _plus_gpu(gpu_seconds)} if gpu_seconds else {}
    result = session.execute(
        move(Transition.FAIL, _held_by(job_id, worker_id)).values(
            error_code=code, error_message=message[:2000], **values
        )
    )
    if result.rowcount:  # type: ignore[attr-defined]
        add_event(session=session, job_id=job_id, payload=FailedPayload(code=code, message=message[:500]))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def mark_canceled(*, session: Session, job_id: uuid.UUID, step: int, worker_id: str, gpu_seconds: float = 0.0) -> bool:
    """Marks a job canceled after its worker stopped it; returns whether the job is (now) deleted."""
    result = session.execute(
        move(Transition.STOP, _held_by(job_id, worker_id)).values(gpu_seconds=_plus_gpu(gpu_seconds))
    )
    if result.rowcount:  # type: ignore[attr-defined]
        add_event(session=session, job_id=job_id, payload=CanceledPayload(step=step))
    return bool(session.scalar(select(Job.deleted).where(Job.id == job_id)))
