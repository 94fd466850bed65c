"""What a webhook says and how it is signed (Standard Webhooks): the `{type, timestamp, data}` body of an event,
and the `webhook-id`, `webhook-timestamp` and `webhook-signature` headers of one attempt."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

from core.jobs.models import GENERATION, Job, JobEvent


def message(event: JobEvent, job: Job, data: dict[str, Any]) -> dict[str, Any]:
    """The body of one webhook: Standard Webhooks' {type, timestamp, data} with the job and event ids in data.
    `type` is `job.<event>`, or `generation.<event>` for a generation. `timestamp` is when the event happened; it is
    the same in every attempt."""
    return {
        "type": f"{'generation' if job.kind == GENERATION else 'job'}.{event.type}",
        "timestamp": event.created_at.isoformat().replace("+00:00", "Z"),
        "data": {"job_id": str(job.id), "job_kind": job.kind, "event_id": event.id, **data},
    }


def message_id(event_id: int) -> str:
    """The `webhook-id` of an event's delivery: the same in every attempt, so receivers can drop repeats."""
    return f"msg_{event_id}"


def sign(secret: str, msg_id: str, timestamp: datetime, body: str) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt (HMAC-SHA256 with the key's secret). `timestamp` is
    the attempt's own time: receivers refuse timestamps more than five minutes old, so a retry signed with the
    event's time could never be verified."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, timestamp, body),
    }
