"""API keys (generated with `secrets`, stored as SHA-256, compared in constant time) and webhook secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets


KEY_PREFIX = "dopsd_"


def generate_api_key() -> str:
    """A new key: a fixed prefix (so leaked keys are recognisable) and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The stored form of a key. Keys are high-entropy, so a fast hash is enough."""
    return hashlib.sha256(key.encode()).hexdigest()


def keys_match(key: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented key with a stored hash."""
    return hmac.compare_digest(hash_api_key(key), stored_hash)


WEBHOOK_SECRET_PREFIX = "whsec_"


def generate_webhook_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` and 192 random bits in base64."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()
