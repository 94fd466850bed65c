"""Which URLs may receive webhooks, and which addresses a delivery may connect to: the checks of
`core/outbound.py` (shared with `spec.images_url`), with the webhook's wording and its event filter.

A webhook URL is read at submission and at every attempt; an attempt resolves the host once, checks every address
it got, and connects to exactly those (`Target.addresses`).
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from core.errors import InvalidSpec
from core.events import DEFAULT_WEBHOOK_EVENTS, EventType
from core.outbound import (
    WEBHOOK,
    AddressPolicy,
    HostUnresolved,
    IPAddress,
    Resolver,
    Target,
    TargetError,
    UrlInvalid,
    any_address,
    embedded_ipv4,
    policy_for,
    public_only,
    redacted,
    system_resolver,
)
from core.outbound import check_target as check_outbound_target
from core.outbound import parse_url as parse_outbound_url


# The webhook names of the shared errors (the same classes).
WebhookTargetError = TargetError
WebhookUrlInvalid = UrlInvalid
WebhookHostUnresolved = HostUnresolved

__all__ = [
    "AddressPolicy", "IPAddress", "Resolver", "Target", "WebhookHostUnresolved", "WebhookTargetError",
    "WebhookUrlInvalid", "any_address", "check_target", "embedded_ipv4", "parse_url", "policy_for", "public_only",
    "redacted", "system_resolver", "validate_webhook",
]  # fmt: skip


def parse_url(url: str) -> httpx.URL:
    """The webhook URL as the sender reads it; `WebhookUrlInvalid` unless it is http(s) with a valid host and
    port."""
    return parse_outbound_url(url, WEBHOOK)


def check_target(url: str, policy: AddressPolicy, resolver: Resolver = system_resolver) -> Target:
    """Parses a webhook URL, resolves its host once and checks every address with `policy`. Returns the target
    with the checked addresses; raises `WebhookUrlInvalid`, `WebhookHostUnresolved`, or `WebhookTargetError` when
    any address is refused."""
    return check_outbound_target(url, policy, resolver, WEBHOOK)


def validate_webhook(
    url: str | None, events: Sequence[str] | None, *, allow_private: bool, resolver: Resolver = system_resolver
) -> list[str] | None:
    """The event filter of a job's webhook (default `DEFAULT_WEBHOOK_EVENTS`). A malformed URL raises
    `InvalidSpec` with code `webhook_url_invalid`, a refused or unresolvable target `webhook_url_refused` (both
    answer 422)."""
    if url is None:
        return None
    try:
        check_target(url, policy_for(allow_private), resolver)
    except WebhookUrlInvalid as exc:
        raise InvalidSpec(str(exc), code="webhook_url_invalid") from exc
    except WebhookTargetError as exc:
        raise InvalidSpec(str(exc), code="webhook_url_refused") from exc
    return [EventType(e).value for e in dict.fromkeys(events or DEFAULT_WEBHOOK_EVENTS)]
