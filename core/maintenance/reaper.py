"""The reaper and retention passes: recovery of jobs whose worker died or whose message was lost, deletion of
finished jobs' data after the retention period, and the sweep of deleted jobs (what they left in storage, then
their personal data once the deletion grace period is over)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.db import session_scope
from core.jobs import recovery
from core.storage import ArtifactStore, job_prefix


logger = logging.getLogger(__name__)

# Sends a job's message to its queue (in the services: `core.queue.enqueue` bound to the settings).
Dispatch = Callable[[uuid.UUID, str], None]


def reap_once(*, settings: Settings, sessions: sessionmaker[Session], dispatch: Dispatch) -> int:
    """One recovery pass: requeues or fails jobs whose lease ran out, offers again queued jobs whose message is
    overdue, drops expired idempotency records; returns how many messages were sent. A send that fails is left
    to the next pass (the job stays queued, its message overdue)."""
    with session_scope(sessions) as session:
        to_send = recovery.reap(
            session=session,
            max_attempts=settings.max_attempts,
            dispatch_grace_s=settings.dispatch_grace_s,
            idempotency_ttl_s=settings.idempotency_ttl_s,
        )
    for job_id, queue in to_send:
        try:
            dispatch(job_id, queue)
        except Exception as exc:
            logger.warning("reaper: cannot dispatch job %s: %s", job_id, type(exc).__name__)
    if to_send:
        logger.info("reaper: dispatched %d job(s)", len(to_send))
    return len(to_send)


def purge_expired(
    *, sessions: sessionmaker[Session], store: ArtifactStore, retention_days: float, deletion_grace_s: float
) -> int:
    """Deletes the stored objects of jobs finished more than `retention_days` ago, then hides the jobs (they
    answer 404); then sweeps deleted jobs (`sweep_deleted`). Returns how many jobs it changed. Objects go first,
    so a storage failure is retried at the next pass."""
    expired: list[uuid.UUID] = []
    if retention_days > 0:  # 0: keep forever
        with session_scope(sessions) as session:
            expired = recovery.jobs_past_retention(session=session, older_than_days=retention_days)
    for job_id in expired:
        store.delete_prefix(job_prefix(job_id))
        with session_scope(sessions) as session:
            recovery.purge_job(session=session, job_id=job_id)
    if expired:
        logger.info("retention: purged %d job(s)", len(expired))
    return len(expired) + sweep_deleted(sessions=sessions, store=store, grace_s=deletion_grace_s)


def sweep_deleted(*, sessions: sessionmaker[Session], store: ArtifactStore, grace_s: float) -> int:
    """Empties the prefix of each deleted job whose worker has stopped (what a stopping worker, a lost one or a
    failed storage call left), then erases the personal data of deleted jobs deleted more than `grace_s` ago;
    returns how many jobs it changed. A storage failure leaves the job to the next pass."""
    with session_scope(sessions) as session:
        leftovers = recovery.deleted_jobs_with_objects(session=session)
    for job_id in leftovers:
        removed = store.delete_prefix(job_prefix(job_id))
        with session_scope(sessions) as session:
            recovery.mark_objects_deleted(session=session, job_id=job_id)
        if removed:
            logger.info("deletion sweep: removed %d object(s) left by deleted job %s", removed, job_id)
    with session_scope(sessions) as session:
        to_erase = recovery.jobs_to_erase(session=session, grace_s=grace_s)
        for job_id in to_erase:
            recovery.erase_job_data(session=session, job_id=job_id)
    if to_erase:
        logger.info("deletion sweep: erased the data of %d deleted job(s)", len(to_erase))
    return len(leftovers) + len(to_erase)
