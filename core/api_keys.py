"""API keys: registering, revoking and authenticating the keys clients present (only hashes are stored).

An API process may keep a key it authenticated for `CACHE_S` (`api.principals`) while no key was revoked since:
each revocation, once committed, increments a counter in the Redis the API replicas share (`REVOCATIONS_KEY`),
which every request reads with its rate limit. A revocation thus takes effect at once on every replica. If that
Redis cannot be told, `announce_revocation` waits out `CACHE_S` instead, so that when it returns no replica accepts
the key any more."""

from __future__ import annotations

import logging
import time
import uuid

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import Conflict, NotFound, Unauthorized
from core.jobs.client_side import request_cancel
from core.jobs.models import ApiKey, Job, WebhookDelivery, utcnow
from core.jobs.states import JobStatus
from core.security import generate_api_key, generate_webhook_secret, hash_api_key


logger = logging.getLogger(__name__)

REVOCATIONS_KEY = "dopsd:api-keys:revocations"
CACHE_S = 5.0  # the longest an API process keeps an authenticated key without reading it from the database again


def create_api_key(*, session: Session, name: str, key: str | None = None) -> tuple[ApiKey, str]:
    """Registers a key (a new random one unless `key` is given) and returns it; only its hash is stored.

    The key also gets its webhook signing secret (`record.webhook_secret`), shown with the key once.
    """
    key = key or generate_api_key()
    record = ApiKey(name=name, key_hash=hash_api_key(key), prefix=key[:10], webhook_secret=generate_webhook_secret())
    session.add(record)
    session.flush()
    return record, key


def ensure_api_key(*, session: Session, name: str, key: str) -> ApiKey:
    """Registers `key` if it is not known yet (the development key of embedded mode).

    A key that was revoked stays revoked: a restart must not bring back a key an operator took away.
    """
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
    if existing is not None:
        if existing.revoked_at is not None:
            logger.warning("the development key %s... was revoked and stays revoked", existing.prefix)
        existing.webhook_secret = existing.webhook_secret or generate_webhook_secret()
        return existing
    return create_api_key(session=session, name=name, key=key)[0]


def find_key(*, session: Session, selector: str) -> ApiKey:
    """The one key `selector` names exactly: the key itself, its id, or its name.

    Never a prefix (ten characters carry too few random bits to name one key safely); a name that several active
    keys share is refused as ambiguous (`Conflict`), with their ids, so an operator picks one.
    """
    by_hash = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(selector)))
    if by_hash is not None:
        return by_hash
    try:
        by_id = session.get(ApiKey, uuid.UUID(selector))
    except ValueError:
        by_id = None
    if by_id is not None:
        return by_id
    named = list(session.scalars(select(ApiKey).where(ApiKey.name == selector).order_by(ApiKey.created_at)))
    active = [k for k in named if k.revoked_at is None]
    if len(active) > 1:
        ids = ", ".join(str(k.id) for k in active)
        raise Conflict(f"{len(active)} active keys are named {selector!r}: revoke one by its id ({ids})",
                       code="ambiguous_key")  # fmt: skip
    if active or named:
        return (active or named)[0]
    raise NotFound(f"no key is {selector!r} (give the key, its id or its exact name)", code="key_not_found")


def revoke_api_key(*, session: Session, selector: str) -> ApiKey:
    """Revokes the key `selector` names exactly (see `find_key`), at once.

    What the key started stops too: nobody can read a revoked key's jobs any more (another key's job answers
    404), so its queued jobs are canceled, its running ones asked to stop, and its pending webhooks dropped.
    Its stored data then follows retention. Revoking a revoked key changes nothing.
    """
    record = find_key(session=session, selector=selector)
    if record.revoked_at is not None:
        return record
    record.revoked_at = utcnow()
    live = session.scalars(
        select(Job).where(
            Job.owner_id == record.id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]), Job.deleted.is_(False)
        )
    )
    for job in live:
        request_cancel(session=session, job=job)
    for delivery in session.scalars(
        select(WebhookDelivery)
        .join(Job, Job.id == WebhookDelivery.job_id)
        .where(Job.owner_id == record.id, WebhookDelivery.status == "pending")
    ):
        delivery.status = "failed"
        delivery.attempts = [*delivery.attempts, {"at": utcnow().isoformat(), "status_code": None,
                                                  "error": "the API key was revoked"}]  # fmt: skip
    session.flush()
    return record


def announce_revocation(redis_url: str | None) -> None:
    """Tells every API replica that a key was revoked (call it once the revocation is committed), through the
    Redis they share (`Settings.shared_redis_url`): they stop accepting any key they kept in memory and read it
    again. Without Redis (embedded mode: the API keeps nothing) there is nobody to tell; if Redis does not answer,
    this waits `CACHE_S`, after which no replica still holds a key it read before the revocation."""
    if redis_url is None:
        return
    try:
        with redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0) as client:
            client.incr(REVOCATIONS_KEY)
    except redis.RedisError as exc:
        logger.warning(
            "could not tell the API replicas of the revocation (%s); waiting %.0f s for their caches to expire",
            type(exc).__name__, CACHE_S,
        )  # fmt: skip
        time.sleep(CACHE_S)


def authenticate(*, session: Session, key: str) -> ApiKey:
    """The active key record for a presented key; `Unauthorized` otherwise (same answer for unknown and revoked).

    The lookup is by SHA-256 of the presented key, so no stored secret is ever compared byte by byte.
    """
    record = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
    if record is None or record.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key")
    return record
