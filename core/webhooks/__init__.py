"""Signed webhooks (Standard Webhooks): which targets are allowed (`targets`), what is sent and how it is signed
(`signing`), the delivery outbox in the database (`outbox`), one bounded POST (`posting`) and the sender pass
(`delivery`).

Deliveries are rows written with their event (`core.events.add_event`), so a crash loses none; any process that
runs `deliver_due` may send them, and a claim is a conditional UPDATE, so none is sent twice at once.
"""

from __future__ import annotations

from core.webhooks.delivery import DeliveryLimits, deliver_due
from core.webhooks.outbox import Claim, PublicData, claim_due, list_deliveries
from core.webhooks.posting import USER_AGENT
from core.webhooks.signing import message, sign
from core.webhooks.targets import (
    AddressPolicy,
    Resolver,
    Target,
    WebhookHostUnresolved,
    WebhookTargetError,
    WebhookUrlInvalid,
    any_address,
    check_target,
    policy_for,
    public_only,
    redacted,
    system_resolver,
    validate_webhook,
)


__all__ = [
    "USER_AGENT", "AddressPolicy", "Claim", "DeliveryLimits", "PublicData", "Resolver", "Target",
    "WebhookHostUnresolved", "WebhookTargetError", "WebhookUrlInvalid", "any_address", "check_target", "claim_due",
    "deliver_due", "list_deliveries", "message", "policy_for", "public_only", "redacted", "sign", "system_resolver",
    "validate_webhook",
]  # fmt: skip
