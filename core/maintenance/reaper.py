"""The reaper and retention passes: recovery of jobs whose worker died or whose message was lost, and deletion of
finished jobs' data after the retention period."""

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

# Sends a job's message to its queue (in the services: `core.queue.enqueue_training` bound to the settings).
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


def purge_expired(*, sessions: sessionmaker[Session], store: ArtifactStore, retention_days: float) -> int:
    """Deletes the stored objects of jobs finished more than `retention_days` ago, then hides the jobs (they
    answer 404); returns how many. Objects go first, so a storage failure is retried at the next pass."""
    if retention_days <= 0:  # 0: keep forever
        return 0
    with session_scope(sessions) as session:
        expired = recovery.jobs_past_retention(session=session, older_than_days=retention_days)
    for job_id in expired:
        store.delete_prefix(job_prefix(job_id))
        with session_scope(sessions) as session:
            recovery.purge_job(session=session, job_id=job_id)
    if expired:
        logger.info("retention: purged %d job(s)", len(expired))
    return len(expired)
