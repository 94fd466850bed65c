"""The webhook sender pass: due deliveries from the outbox, signed with the owner key's secret, sent within the
bounds of the settings. Claims let several senders share the work without sending one delivery twice at once."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.webhooks import DeliveryLimits, PublicData, deliver_due, policy_for


__all__ = ["PublicData", "delivery_limits", "send_once"]


def delivery_limits(settings: Settings) -> DeliveryLimits:
    """The bounds of a sender pass from the settings (`DOPSD_WEBHOOK_*`)."""
    return DeliveryLimits(
        attempt_timeout_s=settings.webhook_attempt_timeout_s,
        concurrency=settings.webhook_concurrency,
        per_key=settings.webhook_max_per_key,
        max_response_bytes=settings.webhook_max_response_bytes,
    )


def send_once(*, settings: Settings, sessions: sessionmaker[Session], public_data: PublicData) -> int:
    """Attempts the due deliveries once (up to `webhook_concurrency` of them, at once); returns how many."""
    return deliver_due(
        sessions,
        public_data=public_data,
        retry_delays_s=settings.webhook_retry_delays_s,
        limits=delivery_limits(settings),
        policy=policy_for(settings.webhook_allow_private),
    )
