"""The sender pass: claims due deliveries and makes one attempt of each, at once, each isolated and bounded.

What a receiver or a URL can do to the pass is bounded: an attempt's total time (resolution, connection,
request, answer) is at most `DeliveryLimits.attempt_timeout_s`, its answer costs at most a few KiB
(`core.webhooks.posting`), and whatever goes wrong in one attempt (a malformed URL, a refused address, an error
of our own) is recorded on that delivery and touches no other. Attempts run concurrently, so one tenant's slow
receiver delays nobody else's delivery; the claims are fair (`claim_due`) and outlast every attempt.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import httpx
from anyio import to_thread
from sqlalchemy.orm import Session, sessionmaker

from core.db import session_scope
from core.jobs.models import utcnow
from core.webhooks.outbox import Claim, Outgoing, PublicData, claim_due, outgoing, record_attempt
from core.webhooks.posting import post_pinned, sender_client
from core.webhooks.signing import sign
from core.webhooks.targets import (
    AddressPolicy,
    Resolver,
    WebhookHostUnresolved,
    WebhookTargetError,
    check_target,
    public_only,
    redacted,
    system_resolver,
)


logger = logging.getLogger(__name__)

CLAIM_MARGIN_S = 30.0  # what a claim allows beyond its attempt: reading the delivery, recording, clock skew


@dataclass(frozen=True)
class DeliveryLimits:
    """The bounds of a sender pass (settings `DOPSD_WEBHOOK_*`)."""

    attempt_timeout_s: float = 10.0
    concurrency: int = 8
    per_key: int = 2
    max_response_bytes: int = 4096

    @property
    def claim_s(self) -> float:
        """How long a claimed delivery is this sender's: twice the longest attempt plus a margin, and a delivery
        whose claim no longer covers a whole attempt is not sent (so two senders never send it at once)."""
        return 2 * self.attempt_timeout_s + CLAIM_MARGIN_S


@dataclass
class _Outcome:
    status_code: int | None = None
    error: str | None = None
    final: bool = False  # failed for good: no retry
    sent: bool = False  # a request went out (its duration is recorded)

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def deliver_due(
    sessions: sessionmaker[Session],
    *,
    public_data: PublicData,
    retry_delays_s: Sequence[float],
    limits: DeliveryLimits | None = None,
    policy: AddressPolicy = public_only,
    resolver: Resolver = system_resolver,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Claims up to `limits.concurrency` due deliveries and attempts each once, all at once; returns how many
    were claimed.

    `public_data(type, data)` turns stored event data into what clients see (signed URLs). A 2xx answer
    delivers; anything else is retried after the next of `retry_delays_s`, and fails for good once they are used
    up. The target is resolved and checked with `policy` at each attempt (its host may have moved to a private
    address since submission), and the attempt connects only to the addresses checked.
    """
    limits = limits or DeliveryLimits()
    with session_scope(sessions) as session:
        claims = claim_due(session=session, limit=limits.concurrency, per_key=limits.per_key, claim_s=limits.claim_s)
    if claims:
        pass_ = _Pass(sessions, public_data, list(retry_delays_s), limits, policy, resolver, ssl_context)
        anyio.run(pass_.run, claims)
    return len(claims)


@dataclass
class _Pass:
    """One pass over its claims: every attempt at once, in one event loop, with one HTTP client."""

    sessions: sessionmaker[Session]
    public_data: PublicData
    retry_delays_s: list[float]
    limits: DeliveryLimits
    policy: AddressPolicy
    resolver: Resolver
    ssl_context: ssl.SSLContext | None

    async def run(self, claims: list[Claim]) -> None:
        client = sender_client(
            timeout_s=self.limits.attempt_timeout_s,
            max_connections=self.limits.concurrency,
            ssl_context=self.ssl_context,
        )
        async with client, anyio.create_task_group() as group:
            for claim in claims:
                group.start_soon(self._isolated, client, claim)

    async def _isolated(self, client: httpx.AsyncClient, claim: Claim) -> None:
        """One attempt, recorded; nothing it raises reaches the other attempts of the pass."""
        try:
            await self._attempt(client, claim)
        except Exception:  # e.g. the database is down: the claim runs out and the delivery is tried again
            logger.exception("webhook delivery %d: the attempt could not be recorded", claim.delivery_id)

    async def _attempt(self, client: httpx.AsyncClient, claim: Claim) -> None:
        started_at, started = utcnow(), time.monotonic()
        url = "?"
        try:
            out = await to_thread.run_sync(outgoing, self.sessions, claim.delivery_id, self.public_data)
            url = out.url
            if (claim.until - utcnow()).total_seconds() < self.limits.attempt_timeout_s + CLAIM_MARGIN_S / 2:
                logger.warning("webhook delivery %d: claim too short to send; left for later", claim.delivery_id)
                return
            outcome = await self._send(client, out)
        except Exception as exc:  # our own failure (reading the event, signing its URLs): tried again later
            logger.exception("webhook delivery %d: attempt failed before sending", claim.delivery_id)
            outcome = _Outcome(error=f"internal error ({type(exc).__name__})")
        attempt: dict[str, Any] = {
            "at": started_at.isoformat(),
            "status_code": outcome.status_code,
            "error": outcome.error,
        }
        if outcome.sent:
            attempt["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        await to_thread.run_sync(
            partial(
                record_attempt, self.sessions, claim, attempt,
                delivered=outcome.delivered, final=outcome.final, retry_delays_s=self.retry_delays_s,
            )
        )  # fmt: skip
        if not outcome.delivered:
            logger.info("webhook delivery %d to %s failed: %s", claim.delivery_id, redacted(url), outcome.error)

    async def _send(self, client: httpx.AsyncClient, out: Outgoing) -> _Outcome:
        if out.body is None or not out.secret:
            return _Outcome(error="the job or its key is gone", final=True)
        timeout_s = self.limits.attempt_timeout_s
        deadline = anyio.current_time() + timeout_s
        try:
            with anyio.fail_after(timeout_s):
                target = await to_thread.run_sync(
                    check_target, out.url, self.policy, self.resolver, abandon_on_cancel=True
                )
        except WebhookTargetError as exc:  # refused for good, or (unresolvable) tried again later
            return _Outcome(error=str(exc), final=not isinstance(exc, WebhookHostUnresolved))
        except TimeoutError:
            return _Outcome(error=f"the webhook host did not resolve within {timeout_s:g} s")
        headers = {**sign(out.secret, out.msg_id, utcnow(), out.body), "content-type": "application/json"}
        outcome = _Outcome(sent=True)
        try:
            outcome.status_code = await post_pinned(
                client, target, out.body.encode(), headers,
                deadline=deadline, max_response_bytes=self.limits.max_response_bytes,
            )  # fmt: skip
        except TimeoutError:
            outcome.error = f"no answer within {timeout_s:g} s"
        except httpx.HTTPError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"[:300]
        else:
            if not outcome.delivered:
                outcome.error = f"the receiver answered {outcome.status_code}"
        return outcome
