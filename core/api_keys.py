"""API keys: registering, revoking and authenticating the keys clients present (only hashes are stored)."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from core.errors import Unauthorized
from core.jobs.models import ApiKey, utcnow
from core.security import generate_api_key, generate_webhook_secret, hash_api_key


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
    """Registers `key` if it is not known yet (the development key of embedded mode)."""
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
    if existing is not None:
        existing.revoked_at = None
        existing.webhook_secret = existing.webhook_secret or generate_webhook_secret()
        return existing
    return create_api_key(session=session, name=name, key=key)[0]


def revoke_api_key(*, session: Session, prefix_or_name: str) -> int:
    """Revokes every active key with this name or key prefix; returns how many."""
    keys = session.scalars(
        select(ApiKey).where(
            or_(ApiKey.name == prefix_or_name, ApiKey.prefix == prefix_or_name[:10]), ApiKey.revoked_at.is_(None)
        )
    ).all()
    for k in keys:
        k.revoked_at = utcnow()
    return len(keys)


def authenticate(*, session: Session, key: str) -> ApiKey:
    """The active key record for a presented key; `Unauthorized` otherwise (same answer for unknown and revoked).

    The lookup is by SHA-256 of the presented key, so no stored secret is ever compared byte by byte.
    """
    record = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
    if record is None or record.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key")
    return record
