"""The webhook sender every API replica runs: sends due deliveries from the outbox, signed with the owner key's
secret; claims make replicas share the work without sending one delivery twice at once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from api.public_events import public_event_data
from core.webhooks import deliver_due


logger = logging.getLogger(__name__)


def send_once(app: FastAPI, client: httpx.Client) -> int:
    """One pass over due deliveries; returns how many were attempted."""
    settings, store = app.state.settings, app.state.store

    def public(type_: str, data: dict[str, Any]) -> dict[str, Any]:
        return public_event_data(type_, data, store, settings.presigned_url_ttl_s)

    return deliver_due(
        app.state.sessionmaker,
        public_data=public,
        retry_delays_s=settings.webhook_retry_delays_s,
        client=client,
        allow_private=settings.webhook_allow_private,
    )


async def webhook_loop(app: FastAPI) -> None:
    """Runs `send_once` every `webhook_poll_interval_s` until cancelled; errors are logged, never fatal."""
    with httpx.Client(follow_redirects=False) as client:
        while True:
            try:
                sent = await run_in_threadpool(send_once, app, client)
            except Exception:
                logger.exception("webhook pass failed")
                sent = 0
            if not sent:
                await asyncio.sleep(app.state.settings.webhook_poll_interval_s)
