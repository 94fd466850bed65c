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
    return len(to_send)


async def reaper_loop(app: FastAPI) -> None:
    """Runs `reap_once` every `reaper_interval_s` until cancelled; errors are logged, never fatal."""
    while True:
        await asyncio.sleep(app.state.settings.reaper_interval_s)
        try:
            await run_in_threadpool(reap_once, app)
        except Exception:
            logger.exception("reaper pass failed")
