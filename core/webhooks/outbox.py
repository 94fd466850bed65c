"""The delivery outbox in the database: claiming due deliveries fairly, reading what one attempt sends, and
recording each attempt.

Deliveries are rows written with their event (`core.events.add_event`), so a crash loses none. A claim moves a
row's `next_attempt_at` to the end of the claim (a conditional UPDATE under `FOR UPDATE SKIP LOCKED`), so no
other sender takes it meanwhile; the claim is longer than an attempt can last (`DeliveryLimits.claim_s`), and
that end time is the claim's token: a sender whose claim was taken over still records its attempt, but leaves
the schedule to the new owner.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import session_scope
from core.jobs.models import ApiKey, Job, JobEvent, WebhookDelivery, utcnow
from core.webhooks.signing import message, message_id


# What clients see of stored event data, by event type (stored object keys become signed download URLs).
PublicData = Callable[[str, dict[str, Any]], dict[str, Any]]

_SAME_CLAIM = timedelta(milliseconds=1)  # a timestamp read back from the database is this close to the one written


@dataclass(frozen=True)
class Claim:
    """One delivery this sender holds until `until` (also the claim's token)."""

    delivery_id: int
    until: datetime


@dataclass(frozen=True)
class Outgoing:
    """What one attempt sends: the URL, the stable message id, the body and the owner key's secret (`None` for
    the body or the secret: the job or its key is gone, and the delivery fails for good)."""

    delivery_id: int
    url: str
    msg_id: str
    body: str | None
    secret: str | None


def claim_due(*, session: Session, limit: int, per_key: int, claim_s: float) -> list[Claim]:
    """Takes up to `limit` due deliveries for `claim_s` seconds, skipping rows another sender holds: the oldest
    due delivery of each job (a job's webhooks go out one at a time, in order) and at most `per_key` per owner
    key, so one tenant's backlog cannot fill a pass while another tenant's delivery waits. (One sender sends a
    job's webhooks in order; senders on several replicas may overlap a job's, never one delivery.)"""
    now = utcnow()
    due = (WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
    firsts = (
        select(
            WebhookDelivery.id.label("id"),
            Job.owner_id.label("owner_id"),
            func.row_number().over(partition_by=WebhookDelivery.job_id, order_by=WebhookDelivery.id).label("n"),
        )
        .join(Job, Job.id == WebhookDelivery.job_id)
        .where(*due)
        .subquery()
    )
    per_owner = (
        select(
            firsts.c.id,
            func.row_number().over(partition_by=firsts.c.owner_id, order_by=firsts.c.id).label("n"),
        )
        .where(firsts.c.n == 1)
        .subquery()
    )
    chosen = select(per_owner.c.id).where(per_owner.c.n <= per_key).order_by(per_owner.c.id).limit(limit)
    # Window functions cannot be locked: lock the chosen rows in a second statement, which sees them again as
    # they are now (another sender may have claimed some since) and skips those another sender holds.
    locked = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.id.in_(chosen.scalar_subquery()), *due)
        .order_by(WebhookDelivery.id)
        .with_for_update(skip_locked=True)
    )
    ids = list(session.scalars(locked))
    if not ids:
        return []
    until = now + timedelta(seconds=claim_s)
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).values(next_attempt_at=until))
    return [Claim(delivery_id=i, until=until) for i in ids]


def outgoing(sessions: sessionmaker[Session], delivery_id: int, public_data: PublicData) -> Outgoing:
    """Reads what one attempt of the delivery sends (the body as clients see it, with signed URLs)."""
    with sessions() as session:
        delivery = session.get_one(WebhookDelivery, delivery_id)
        event, job = session.get(JobEvent, delivery.event_id), session.get(Job, delivery.job_id)
        secret = session.scalar(select(ApiKey.webhook_secret).where(ApiKey.id == job.owner_id)) if job else None
        body = json.dumps(message(event, job, public_data(event.type, event.data))) if event and job else None
        return Outgoing(
            delivery_id=delivery_id, url=delivery.url, msg_id=message_id(delivery.event_id), body=body, secret=secret
        )


def record_attempt(
    sessions: sessionmaker[Session],
    claim: Claim,
    attempt: dict[str, Any],
    *,
    delivered: bool,
    final: bool,
    retry_delays_s: Sequence[float],
) -> None:
    """Appends `attempt` to the delivery (under a row lock, so no concurrent record is lost) and settles it:
    delivered, failed for good (`final`, or the retries are used up), or due again after the next retry delay.
    The schedule is changed only while the claim is still this sender's; a delivery is never un-delivered."""
    with session_scope(sessions) as session:
        delivery = session.get_one(WebhookDelivery, claim.delivery_id, with_for_update=True)
        attempts = [*delivery.attempts, attempt]
        delivery.attempts = attempts
        if delivered:
            delivery.status = "delivered"
            return
        still_ours = abs(delivery.next_attempt_at - claim.until) < _SAME_CLAIM
        if delivery.status != "pending" or not still_ours:
            return
        if final or len(attempts) > len(retry_delays_s):
            delivery.status = "failed"
        else:
            delivery.next_attempt_at = utcnow() + timedelta(seconds=retry_delays_s[len(attempts) - 1])


def list_deliveries(*, session: Session, job_id: uuid.UUID, limit: int = 200) -> list[WebhookDelivery]:
    """A job's webhook deliveries, oldest first, with their attempts."""
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id).limit(limit)
    return list(session.scalars(query))
