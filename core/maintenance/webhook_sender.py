"""The webhook sender pass: due deliveries from the outbox, signed with the owner key's secret. Claims let several
senders share the work without sending one delivery twice at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.webhooks import deliver_due


# What clients see of stored event data, by event type (stored object keys become signed download URLs).
PublicData = Callable[[str, dict[str, Any]], dict[str, Any]]


def send_once(
    *, settings: Settings, sessions: sessionmaker[Session], public_data: PublicData, client: httpx.Client
) -> int:
    """Attempts every due delivery once; returns how many were attempted."""
    return deliver_due(
        sessions,
        public_data=public_data,
        retry_delays_s=settings.webhook_retry_delays_s,
        client=client,
        allow_private=settings.webhook_allow_private,
    )
