"""Signed webhooks (Standard Webhooks): which targets are allowed, which events a job announces, and the
delivery outbox — claiming due deliveries, signing, recording every attempt, backing off on failure.

Deliveries are rows written with their event (`core.events.add_event`), so a crash loses none; any process that runs
`deliver_due` (every API replica does) may send them, and a claim is a conditional UPDATE, so none is sent twice
at once.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from core.db import session_scope
from core.errors import InvalidSpec
from core.events import DEFAULT_WEBHOOK_EVENTS, EventType
from core.jobs.models import ApiKey, Job, JobEvent, WebhookDelivery, utcnow


logger = logging.getLogger(__name__)

CLAIM_S = 60  # a claimed delivery is someone's to send for this long; then anyone may retry it
TIMEOUT_S = 10.0
USER_AGENT = "dopsd-webhooks/1"


class WebhookTargetError(Exception):
    """The URL may not receive webhooks (bad scheme, unresolvable, or a private address)."""


class WebhookHostUnresolved(WebhookTargetError):
    """The webhook's host name does not resolve (now: a delivery retries later)."""


def check_target(url: str, *, allow_private: bool) -> None:
    """Refuses URLs a webhook may not reach: not http(s), no host, or (unless allowed) a host that resolves to a
    loopback, private, link-local or otherwise non-public address (the service must not probe its own network)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookTargetError("the webhook URL must be an http:// or https:// URL with a host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookHostUnresolved(f"the webhook host {parts.hostname!r} does not resolve") from exc
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]))
        if not address.is_global:
            raise WebhookTargetError(
                f"the webhook host {parts.hostname!r} is on a private or loopback address ({address})"
            )


def validate_webhook(url: str | None, events: Sequence[str] | None, *, allow_private: bool) -> list[str] | None:
    """The event filter of a job's webhook (default `DEFAULT_WEBHOOK_EVENTS`); `InvalidSpec` for a refused target."""
    if url is None:
        return None
    try:
        check_target(url, allow_private=allow_private)
    except WebhookTargetError as exc:
        raise InvalidSpec(str(exc), code="webhook_url_refused") from exc
    return [EventType(e).value for e in dict.fromkeys(events or DEFAULT_WEBHOOK_EVENTS)]


def message(event: JobEvent, job: Job, data: dict[str, Any]) -> dict[str, Any]:
    """The body of one webhook: Standard Webhooks' {type, timestamp, data} with the job and event ids in data."""
    return {
        "type": f"job.{event.type}",
        "timestamp": event.created_at.isoformat().replace("+00:00", "Z"),
        "data": {"job_id": str(job.id), "job_kind": job.kind, "event_id": event.id, **data},
    }


def sign(secret: str, msg_id: str, timestamp: datetime, body: str) -> dict[str, str]:
    """The three Standard Webhooks headers of one message (HMAC-SHA256 with the key's secret)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, timestamp, body),
    }


def claim_due(*, session: Session, limit: int = 20) -> list[int]:
    """Takes up to `limit` due deliveries for `CLAIM_S` seconds (skipping rows another sender holds)."""
    now = utcnow()
    due = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(session.scalars(due))
    if ids:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(ids))
            .values(next_attempt_at=now + timedelta(seconds=CLAIM_S))
        )
    return ids


def deliver_due(
    sessions: sessionmaker[Session],
    *,
    public_data: Callable[[str, dict[str, Any]], dict[str, Any]],
    retry_delays_s: Sequence[float],
    client: httpx.Client,
    allow_private: bool = False,
) -> int:
    """Sends every due delivery once; returns how many were attempted.

    `public_data(type, data)` turns stored event data into what clients see (signed URLs). A 2xx answer delivers;
    anything else is retried after the next of `retry_delays_s`, and fails for good once they are used up. The
    target is checked again before each attempt (its host may have moved to a private address since submission).
    """
    with session_scope(sessions) as session:
        ids = claim_due(session=session)
    for delivery_id in ids:
        _attempt(sessions, delivery_id, public_data, retry_delays_s, client, allow_private)
    return len(ids)


def _attempt(
    sessions: sessionmaker[Session],
    delivery_id: int,
    public_data: Callable[[str, dict[str, Any]], dict[str, Any]],
    retry_delays_s: Sequence[float],
    client: httpx.Client,
    allow_private: bool,
) -> None:
    with sessions() as session:
        delivery = session.get_one(WebhookDelivery, delivery_id)
        event, job = session.get(JobEvent, delivery.event_id), session.get(Job, delivery.job_id)
        secret = session.scalar(select(ApiKey.webhook_secret).where(ApiKey.id == job.owner_id)) if job else None
        url = delivery.url
        body = json.dumps(message(event, job, public_data(event.type, event.data))) if event and job else None
        created = event.created_at if event else utcnow()
    record: dict[str, Any] = {"at": utcnow().isoformat(), "status_code": None, "error": None}
    ok, final = False, False
    try:
        check_target(url, allow_private=allow_private)
    except WebhookTargetError as exc:  # refused for good, or (unresolvable) tried again later
        record["error"], final = str(exc), not isinstance(exc, WebhookHostUnresolved)
        skip = True
    else:
        skip = False
    if body is None or not secret:
        record["error"], final = "the job or its key is gone", True
    elif not skip:
        headers = {
            **sign(secret, f"msg_{delivery.event_id}", created, body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        started = time.perf_counter()
        try:
            response = client.post(url, content=body, headers=headers, timeout=TIMEOUT_S)
            record["status_code"] = response.status_code
            ok = 200 <= response.status_code < 300
            if not ok:
                record["error"] = f"the receiver answered {response.status_code}"
        except httpx.HTTPError as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"[:300]
        record["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
    with session_scope(sessions) as session:
        delivery = session.get_one(WebhookDelivery, delivery_id)
        attempts = [*delivery.attempts, record]
        delivery.attempts = attempts
        if ok:
            delivery.status = "delivered"
        elif final or len(attempts) > len(retry_delays_s):
            delivery.status = "failed"
        else:
            delivery.next_attempt_at = utcnow() + timedelta(seconds=retry_delays_s[len(attempts) - 1])
    if not ok:
        logger.info("webhook delivery %d to %s failed: %s", delivery_id, url, record["error"])


def list_deliveries(*, session: Session, job_id: uuid.UUID, limit: int = 200) -> list[WebhookDelivery]:
    """A job's webhook deliveries, oldest first, with their attempts."""
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id).limit(limit)
    return list(session.scalars(query))
