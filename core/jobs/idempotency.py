"""`Idempotency-Key`s: a retried create answers with the job the first request made."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.errors import Conflict
from core.jobs.models import IdempotencyRecord, Job, utcnow


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
