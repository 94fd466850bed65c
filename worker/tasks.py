"""The Celery tasks: thin. Each decodes the id and hands the job to its runner, which owns the logic."""

from __future__ import annotations

import uuid

from core.queue import TASK_GENERATE, TASK_TRAIN
from worker.celery_app import app


@app.task(name=TASK_TRAIN, bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def train_job(self: object, job_id: str) -> None:
    """Runs training job `job_id` (a duplicate delivery of a claimed job does nothing)."""
    from core.logs import job_context
    from worker.runner import run_job

    hostname = getattr(getattr(self, "request", None), "hostname", None) or "worker"
    with job_context(job_id):
        run_job(uuid.UUID(job_id), worker_id=str(hostname))


@app.task(name=TASK_GENERATE, bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def generate(self: object, job_id: str) -> None:
    """Runs generation `job_id`, with the queued generations that can share its pipeline calls."""
    from core.logs import job_context
    from worker.generations import run_generation

    hostname = getattr(getattr(self, "request", None), "hostname", None) or "worker"
    with job_context(job_id):
        run_generation(uuid.UUID(job_id), worker_id=str(hostname))
