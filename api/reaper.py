"""The periodic recovery loop the API runs: jobs of dead workers go back to the queue, lost messages are sent
again, old idempotency records go. Every step is a conditional UPDATE, so every API replica may run it."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from core.db import session_scope
from core.jobs import service
from core.queue import enqueue_training
from core.storage import job_prefix


logger = logging.getLogger(__name__)


def reap_once(app: FastAPI) -> int:
    """One pass; returns how many messages were sent."""
    settings = app.state.settings
    with session_scope(app.state.sessionmaker) as session:
        to_send = service.reap(
            session=session,
            max_attempts=settings.max_attempts,
            dispatch_grace_s=settings.dispatch_grace_s,
            idempotency_ttl_s=settings.idempotency_ttl_s,
        )
    for job_id, queue in to_send:
        try:
            enqueue_training(settings, job_id, queue)
        except Exception as exc:  # the next pass sends again
            logger.warning("reaper: cannot dispatch job %s: %s", job_id, type(exc).__name__)
    if to_send:
        logger.info("reaper: dispatched %d job(s)", len(to_send))
    if settings.retention_days > 0:
        purge_expired(app)
    return len(to_send)


def purge_expired(app: FastAPI) -> int:
    """Deletes the stored objects of jobs finished longer ago than the retention period, then hides the jobs."""
    with session_scope(app.state.sessionmaker) as session:
        expired = service.jobs_past_retention(session=session, older_than_days=app.state.settings.retention_days)
    for job_id in expired:
        app.state.store.delete_prefix(job_prefix(job_id))  # objects first: a failure is retried next pass
        with session_scope(app.state.sessionmaker) as session:
            service.purge_job(session=session, job_id=job_id)
    if expired:
        logger.info("retention: purged %d job(s)", len(expired))
    return len(expired)


async def reaper_loop(app: FastAPI) -> None:
    """Runs `reap_once` every `reaper_interval_s` until cancelled; errors are logged, never fatal."""
    while True:
        await asyncio.sleep(app.state.settings.reaper_interval_s)
        try:
            await run_in_threadpool(reap_once, app)
        except Exception:
            logger.exception("reaper pass failed")
