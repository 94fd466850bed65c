"""Downloads of a finished job: which job may be downloaded and where its adapter file is."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from core.errors import Conflict, NotFound
from core.jobs import client_side
from core.jobs.models import Job
from core.jobs.states import JobStatus
from core.storage import ADAPTER_FILES, ArtifactStore


def succeeded_job(*, session: Session, owner_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The caller's job, once it succeeded (artifacts exist only then): 404 for a stranger, 409 before."""
    job = client_side.get_job(session=session, owner_id=owner_id, job_id=job_id)
    if job.job_status != JobStatus.SUCCEEDED:
        raise Conflict(f"job {job.id} is {job.status}; artifacts exist once it succeeded", code="job_not_finished")
    return job


def adapter_url(job: Job, format: str, store: ArtifactStore, ttl_s: int) -> str:
    """A short-lived URL of the job's adapter file in `format`; a format the job did not write is a 404."""
    adapter = next((a for a in job.artifacts if a.name == ADAPTER_FILES[format]), None)
    if adapter is None:
        raise NotFound(
            f"job {job.id} has no {format} adapter (see spec.output_formats)", code="adapter_format_not_written"
        )
    return store.download_url(adapter.key, filename=adapter.name, ttl_s=ttl_s)
