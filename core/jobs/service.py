"""Every state change of keys and jobs lives here, used by both the API and the worker.

Functions take a session and keyword arguments, raise `DomainError`s (never HTTP errors), and leave committing to
the caller, except where one conditional UPDATE must be its own transaction (`claim_job`).
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from core.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from core.jobs.models import ApiKey, IdempotencyRecord, Job, JobArtifact, JobEvent, WebhookDelivery, utcnow
from core.jobs.states import TERMINAL, JobStatus, can_transition
from core.security import generate_api_key, generate_webhook_secret, hash_api_key


# Keys -------------------------------------------------------------------------------------------------------------


def create_api_key(*, session: Session, name: str, key: str | None = None) -> tuple[ApiKey, str]:
    """Registers a key (a new random one unless `key` is given) and returns it; only its hash is stored.

    The key also gets its webhook signing secret (`record.webhook_secret`), shown with the key once.
    """
    key = key or generate_api_key()
    record = ApiKey(name=name, key_hash=hash_api_key(key), prefix=key[:10], webhook_secret=generate_webhook_secret())
    session.add(record)
    session.flush()
    return record, key


def ensure_api_key(*, session: Session, name: str, key: str) -> ApiKey:
    """Registers `key` if it is not known yet (the development key of embedded mode)."""
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
    if existing is not None:
        existing.revoked_at = None
        existing.webhook_secret = existing.webhook_secret or generate_webhook_secret()
        return existing
    return create_api_key(session=session, name=name, key=key)[0]


def revoke_api_key(*, session: Session, prefix_or_name: str) -> int:
    """Revokes every active key with this name or key prefix; returns how many."""
    keys = session.scalars(
        select(ApiKey).where(
            or_(ApiKey.name == prefix_or_name, ApiKey.prefix == prefix_or_name[:10]), ApiKey.revoked_at.is_(None)
        )
    ).all()
    for k in keys:
        k.revoked_at = utcnow()
    return len(keys)


def authenticate(*, session: Session, key: str) -> ApiKey:
    """The active key record for a presented key; `Unauthorized` otherwise (same answer for unknown and revoked).

    The lookup is by SHA-256 of the presented key, so no stored secret is ever compared byte by byte.
    """
    record = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
    if record is None or record.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key")
    return record


# Jobs: the client's side ------------------------------------------------------------------------------------------


def add_event(*, session: Session, job_id: uuid.UUID, type: str, data: dict[str, Any] | None = None) -> JobEvent:
    """Appends to a job's event log; when the job has a webhook that wants this type, the delivery is queued in
    the same transaction (an outbox: an event is never announced without being stored, nor stored unannounced)."""
    event = JobEvent(job_id=job_id, type=type, data=data or {})
    session.add(event)
    hook = session.execute(select(Job.webhook_url, Job.webhook_events).where(Job.id == job_id)).one_or_none()
    if hook is not None and hook[0] and type in (hook[1] or ()):
        session.flush()  # the event's id is the delivery's stable webhook-id
        session.add(WebhookDelivery(job_id=job_id, event_id=event.id, event_type=type, url=hook[0]))
    return event


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
        status=JobStatus.QUEUED.value,
        total_steps=int(config.get("max_train_steps") or 0),
        dispatched_at=utcnow(),  # the caller sends the message right after committing
    )
    session.add(job)
    session.flush()
    add_event(
        session=session,
        job_id=job.id,
        type="queued",
        data={"images": len(images), "position": queue_position(session=session, job=job)},
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
        query = query.where(Job.status == status.value)
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
        .where(Job.queue == queue, Job.status == JobStatus.QUEUED.value, Job.deleted.is_(False))
    )
    return int(session.scalar(query) or 0)


def queue_position(*, session: Session, job: Job) -> int | None:
    """1 for the next job a worker of its queue takes; `None` when not queued."""
    if job.status != JobStatus.QUEUED.value:
        return None
    ahead = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.queue == job.queue,
            Job.status == JobStatus.QUEUED.value,
            Job.deleted.is_(False),
            or_(Job.created_at < job.created_at, and_(Job.created_at == job.created_at, Job.id < job.id)),
        )
    )
    return int(ahead or 0) + 1


def _transition(job: Job, target: JobStatus, **values: Any) -> None:
    if not can_transition(job.job_status, target):
        raise Conflict(f"job {job.id} is {job.status} and cannot become {target.value}", code="invalid_transition")
    job.status = target.value
    for name, value in values.items():
        setattr(job, name, value)
    if target in TERMINAL:
        job.finished_at = utcnow()


def request_cancel(*, session: Session, job: Job) -> Job:
    """Cancels a queued job at once; asks the worker of a running one to stop (within one training step).

    The queued case is one conditional UPDATE, so a worker claiming the job at the same moment wins or loses
    cleanly: if it won, the job is running and gets a stop request instead.
    """
    if job.job_status == JobStatus.QUEUED:
        result = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.CANCELED.value, finished_at=utcnow())
        )
        session.refresh(job)
        if result.rowcount:  # type: ignore[attr-defined]
            add_event(session=session, job_id=job.id, type="canceled", data={"while": "queued"})
            return job
    if job.job_status == JobStatus.RUNNING:
        if not job.cancel_requested:
            job.cancel_requested = True
            add_event(session=session, job_id=job.id, type="cancel_requested")
    elif job.job_status != JobStatus.CANCELED:
        raise Conflict(f"job {job.id} already {job.status}", code="job_not_cancellable")
    return job


def list_events(*, session: Session, job_id: uuid.UUID, after: int, limit: int) -> list[JobEvent]:
    """A job's events with id > `after`, oldest first."""
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)
    return list(session.scalars(query))


# Jobs: the worker's side ------------------------------------------------------------------------------------------


def claim_job(
    *, session: Session, job_id: uuid.UUID, worker_id: str, lease_s: int, max_running_per_key: int = 1_000_000
) -> int | None:
    """Takes a job for this worker in one conditional UPDATE, and commits; returns the attempt number.

    A queued job is taken; so is a running one whose lease ran out (its worker died and the broker delivered the
    message again). Anything else returns None: a duplicate delivery of a live or finished job does nothing, and a
    job whose key already runs `max_running_per_key` jobs stays queued (the reaper offers it again later).
    """
    owner_id = session.scalar(select(Job.owner_id).where(Job.id == job_id))
    if owner_id is None:
        session.commit()
        return None
    # Claims of one key's jobs take turns (a row lock on the key), so two workers cannot both see a free slot.
    session.execute(select(ApiKey.id).where(ApiKey.id == owner_id).with_for_update())
    now = utcnow()
    claimable = or_(
        Job.status == JobStatus.QUEUED.value,
        and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now),
    )
    other = aliased(Job)
    running_of_owner = (
        select(func.count())
        .select_from(other)
        .where(other.owner_id == Job.owner_id, other.status == JobStatus.RUNNING.value, other.id != Job.id)
        .scalar_subquery()
    )
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.deleted.is_(False), claimable, running_of_owner < max_running_per_key)
        .values(
            status=JobStatus.RUNNING.value,
            attempt=Job.attempt + 1,
            worker_id=worker_id,
            started_at=func.coalesce(Job.started_at, now),
            lease_expires_at=now + timedelta(seconds=lease_s),
        )
        .returning(Job.attempt)
    )
    attempt = result.scalar_one_or_none()
    if attempt is not None:
        add_event(session=session, job_id=job_id, type="started", data={"worker": worker_id, "attempt": attempt})
    session.commit()
    return attempt


def renew_lease(*, session: Session, job_id: uuid.UUID, worker_id: str, lease_s: int) -> bool:
    """Extends this worker's lease on a running job; False when the job is no longer this worker's."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING.value)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
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
        type="progress",
        data={
            "step": step,
            "total_steps": total_steps,
            "loss": loss,
            "learning_rate": learning_rate,
            "eta_s": round(eta_s, 1),
            "elapsed_s": None if elapsed_s is None else round(elapsed_s, 2),
        },
    )
    return cancel_requested(session=session, job_id=job_id)


def cancel_requested(*, session: Session, job_id: uuid.UUID) -> bool:
    """Whether the job's owner asked to stop it (or deleted it)."""
    row = session.execute(select(Job.cancel_requested, Job.deleted).where(Job.id == job_id)).one_or_none()
    return row is None or bool(row[0]) or bool(row[1])


def _held_by(job_id: uuid.UUID, worker_id: str | None) -> Any:
    """Rows of a job that is still running for `worker_id` (any running or queued job when None)."""
    if worker_id is None:
        return and_(Job.id == job_id, Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
    return and_(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker_id == worker_id)


def finish_job(
    *,
    session: Session,
    job_id: uuid.UUID,
    worker_id: str,
    artifacts: list[dict[str, Any]],
    metrics: dict[str, Any],
    gpu_seconds: float = 0.0,
) -> bool:
    """Marks the job succeeded with its artifacts, in one transaction (the caller commits).

    One conditional UPDATE: only the worker holding the job may finish it, and not once a cancel or delete was
    asked for. Returns False (and changes nothing) otherwise.
    """
    result = session.execute(
        update(Job)
        .where(_held_by(job_id, worker_id), Job.deleted.is_(False), Job.cancel_requested.is_(False))
        .values(status=JobStatus.SUCCEEDED.value, finished_at=utcnow(), eta_s=0.0, gpu_seconds=_plus_gpu(gpu_seconds))
        .returning(Job.gpu_seconds)
    )
    total = result.scalar_one_or_none()
    if total is None:
        return False
    session.execute(delete(JobArtifact).where(JobArtifact.job_id == job_id))
    session.add_all(JobArtifact(job_id=job_id, **a) for a in artifacts)
    add_event(session=session, job_id=job_id, type="succeeded", data={"gpu_seconds": round(total, 3), **metrics})
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
    worker_id: str | None = None,
    gpu_seconds: float = 0.0,
) -> bool:
    """Marks a job failed with a stable code and a readable message; a worker may fail only a job it holds."""
    values: dict[str, Any] = {"gpu_seconds": _plus_gpu(gpu_seconds)} if gpu_seconds else {}
    result = session.execute(
        update(Job)
        .where(_held_by(job_id, worker_id))
        .values(
            status=JobStatus.FAILED.value,
            finished_at=utcnow(),
            error_code=code,
            error_message=message[:2000],
            **values,
        )
    )
    if result.rowcount:  # type: ignore[attr-defined]
        add_event(session=session, job_id=job_id, type="failed", data={"code": code, "message": message[:500]})
    return bool(result.rowcount)  # type: ignore[attr-defined]


def mark_canceled(*, session: Session, job_id: uuid.UUID, step: int, worker_id: str, gpu_seconds: float = 0.0) -> bool:
    """Marks a job canceled after its worker stopped it; returns whether the job is (now) deleted."""
    result = session.execute(
        update(Job)
        .where(_held_by(job_id, worker_id))
        .values(status=JobStatus.CANCELED.value, finished_at=utcnow(), gpu_seconds=_plus_gpu(gpu_seconds))
    )
    if result.rowcount:  # type: ignore[attr-defined]
        add_event(session=session, job_id=job_id, type="canceled", data={"step": step})
    return bool(session.scalar(select(Job.deleted).where(Job.id == job_id)))


# Recovery: what the periodic reaper does -------------------------------------------------------------------------


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
    expired = and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
    failed = session.execute(
        update(Job)
        .where(expired, Job.attempt >= max_attempts)
        .values(
            status=JobStatus.FAILED.value,
            finished_at=now,
            error_code="too_many_attempts",
            error_message=f"the job was started {max_attempts} times without finishing",
        )
        .returning(Job.id)
    ).scalars()
    for job_id in list(failed):
        add_event(session=session, job_id=job_id, type="failed", data={"code": "too_many_attempts"})
    stopped = session.execute(
        update(Job)
        .where(expired, or_(Job.deleted.is_(True), Job.cancel_requested.is_(True)))
        .values(status=JobStatus.CANCELED.value, finished_at=now)
        .returning(Job.id)
    ).scalars()
    for job_id in list(stopped):
        add_event(session=session, job_id=job_id, type="canceled", data={"while": "worker lost"})
    requeued = session.execute(
        update(Job)
        .where(expired)
        .values(status=JobStatus.QUEUED.value, worker_id=None, lease_expires_at=None, dispatched_at=now)
        .returning(Job.id, Job.queue, Job.attempt)
    ).all()
    for job_id, _, attempt in requeued:
        add_event(session=session, job_id=job_id, type="requeued", data={"after_attempt": attempt})
    stale = session.execute(
        update(Job)
        .where(
            Job.status == JobStatus.QUEUED.value,
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
        .where(Job.deleted.is_(False), Job.status.in_([s.value for s in TERMINAL]), Job.finished_at < cutoff)
        .limit(limit)
    )
    return list(session.scalars(query))


def purge_job(*, session: Session, job_id: uuid.UUID) -> None:
    """Marks a job whose stored objects were deleted by retention (it then answers 404)."""
    job = session.get_one(Job, job_id)
    job.deleted = True
    add_event(session=session, job_id=job_id, type="purged", data={"reason": "retention"})


# Limits and idempotency --------------------------------------------------------------------------------------------


def count_queued(*, session: Session, owner_id: uuid.UUID) -> int:
    """How many of a key's jobs wait in the queue."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner_id == owner_id, Job.status == JobStatus.QUEUED.value, Job.deleted.is_(False))
        )
        or 0
    )


def find_idempotent_job(
    *, session: Session, owner_id: uuid.UUID, key: str, request_hash: str, ttl_s: int
) -> Job | None:
    """The job an earlier request with this `Idempotency-Key` created (within `ttl_s`), if any.

    The same key with a different request is a `Conflict` (`idempotency_key_reused`).
    """
    record = session.scalar(
        select(IdempotencyRecord).where(
            IdempotencyRecord.owner_id == owner_id,
            IdempotencyRecord.key == key,
            IdempotencyRecord.created_at >= utcnow() - timedelta(seconds=ttl_s),
        )
    )
    if record is None:
        return None
    if record.request_hash != request_hash:
        raise Conflict("this Idempotency-Key was used with a different request", code="idempotency_key_reused")
    job = session.get(Job, record.job_id)
    if job is None or job.deleted:  # the job is gone: the key may create a new one
        session.delete(record)
        session.flush()
        return None
    return job


def record_idempotency(
    *, session: Session, owner_id: uuid.UUID, key: str, request_hash: str, job_id: uuid.UUID, ttl_s: int
) -> None:
    """Remembers which job an `Idempotency-Key` created; an expired record of the same key is replaced.

    A live record is never touched: a concurrent request with the same key then fails on the unique constraint
    at commit, and answers with the winner's job.
    """
    session.execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.owner_id == owner_id,
            IdempotencyRecord.key == key,
            IdempotencyRecord.created_at < utcnow() - timedelta(seconds=ttl_s),
        )
    )
    session.add(IdempotencyRecord(owner_id=owner_id, key=key, request_hash=request_hash, job_id=job_id))
