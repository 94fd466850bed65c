"""What a key uses: bytes stored across its jobs (the storage quota), GPU-seconds, jobs by status; and the one
write of a job's stored bytes by its worker.

What "stored" counts: a job's inputs from the moment it is submitted, then, each time one of its worker's attempts
ends, the bytes listed under the job's prefix (checkpoints, samples, adapters, reports: what the worker uploaded).
A deleted job stops counting once it is in a final state: `DELETE` removed its objects (a running job's worker
removes what it stored when it stops), and retention removes them before it marks the job deleted.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from core.jobs.models import ApiKey, Job
from core.jobs.states import TERMINAL


def _counted(owner_id: uuid.UUID) -> ColumnElement[bool]:
    """The key's jobs whose objects may still be stored: not deleted, or deleted while its worker still runs."""
    return (Job.owner_id == owner_id) & or_(Job.deleted.is_(False), Job.status.not_in(sorted(TERMINAL)))


def stored_bytes(*, session: Session, owner_id: uuid.UUID) -> int:
    """Bytes stored across the key's jobs (see the module's docstring for what counts)."""
    return int(session.scalar(select(func.coalesce(func.sum(Job.stored_bytes), 0)).where(_counted(owner_id))) or 0)


@dataclass(frozen=True)
class KeyUsage:
    """One key's totals: jobs (training, previews and generations, deleted ones excluded) by status, GPU-seconds of every job it
    ran (deleted ones included: they were used), and bytes stored now."""

    jobs_by_status: dict[str, int]
    previews_by_status: dict[str, int]
    generations_by_status: dict[str, int]
    gpu_seconds: float
    stored_bytes: int


def key_usage(*, session: Session, owner_id: uuid.UUID) -> KeyUsage:
    """The key's usage, in three aggregate queries."""
    rows = session.execute(
        select(Job.kind, Job.status, func.count())
        .where(Job.owner_id == owner_id, Job.deleted.is_(False))
        .group_by(Job.kind, Job.status)
    ).all()
    jobs = {status: int(n) for kind, status, n in rows if kind == "training"}
    previews = {status: int(n) for kind, status, n in rows if kind == "preview"}
    generations = {status: int(n) for kind, status, n in rows if kind == "generation"}
    gpu = session.scalar(select(func.coalesce(func.sum(Job.gpu_seconds), 0.0)).where(Job.owner_id == owner_id))
    return KeyUsage(
        jobs_by_status=jobs,
        previews_by_status=previews,
        generations_by_status=generations,
        gpu_seconds=float(gpu or 0.0),
        stored_bytes=stored_bytes(session=session, owner_id=owner_id),
    )


def lock_key(*, session: Session, owner_id: uuid.UUID) -> None:
    """Takes the key's row lock for the rest of the transaction (PostgreSQL; SQLite has one writer anyway), so two
    submissions of one key check the quota one after the other."""
    session.execute(select(ApiKey.id).where(ApiKey.id == owner_id).with_for_update())


def record_stored_bytes(*, session: Session, job_id: uuid.UUID, nbytes: int) -> None:
    """Sets what a job has stored (its worker lists the job's prefix when an attempt ends)."""
    session.execute(update(Job).where(Job.id == job_id).values(stored_bytes=nbytes))
