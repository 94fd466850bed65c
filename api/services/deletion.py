"""Deleting a job or a generation on its owner's request: stop it, delete its stored objects, hide it."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from core.errors import ServiceUnavailable
from core.jobs import client_side
from core.jobs.models import Job
from core.storage import ArtifactStore, job_prefix


logger = logging.getLogger(__name__)


def delete_job(session: Session, store: ArtifactStore, job: Job) -> None:
    """Cancels the job if needed and deletes everything stored for it; a storage outage answers 503 and leaves the
    job visible, so the client can retry."""
    if not job.job_status.is_terminal:
        client_side.request_cancel(session=session, job=job)
        session.commit()
    # Objects first: if storage is down the client gets 503 and can retry the delete; the job stays visible.
    store.delete_prefix(job_prefix(job.id))
    client_side.mark_deleted(session=session, job=job)  # hidden from now on
    session.commit()
    # Once more, now that the job is marked: a running worker's upload in between (the sample or checkpoint of its
    # last step) goes now, and what it stores later it deletes itself when it stops. A failure here is left to the
    # maintenance sweep of deleted jobs.
    try:
        store.delete_prefix(job_prefix(job.id))
    except ServiceUnavailable:
        logger.warning("job %s: second pass of its delete failed; left to the deletion sweep", job.id)
