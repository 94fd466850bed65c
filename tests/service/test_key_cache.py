"""The API keeps the keys it authenticated for a few seconds (`api.principals`: a poll costs no key lookup in the
database), and a revocation still takes effect at once: `dopsd keys revoke` commits, then moves the revocation
counter in the shared Redis that every request reads with its rate limit. On the real stack (PostgreSQL, Redis,
the API under uvicorn)."""

from __future__ import annotations

import subprocess
import sys
import time

import sqlalchemy as sa

from core import api_keys
from core.db import make_engine
from core.jobs.models import ApiKey, utcnow
from core.security import hash_api_key
from tests.conftest import REPO, Stack


def test_a_kept_key_is_refused_as_soon_as_a_revocation_is_announced(prod_stack: Stack) -> None:
    """What the cache does and what beats it: a key revoked in the database behind the API's back is still
    accepted for a moment (the API did not read it again), and refused from the moment the counter moves."""
    key = prod_stack.create_key("kept")
    engine = make_engine(prod_stack.database_url, pool_size=1, max_overflow=0)
    with prod_stack.client(key) as client:
        assert client.get("/v1/jobs").status_code == 200  # looked up, and kept
        kept_at = time.monotonic()
        with engine.begin() as connection:
            connection.execute(
                sa.update(ApiKey).where(ApiKey.key_hash == hash_api_key(key)).values(revoked_at=utcnow())
            )
        still = client.get("/v1/jobs").status_code
        assert time.monotonic() - kept_at < api_keys.CACHE_S, "too slow to see the kept key: rerun on a calmer machine"
        assert still == 200  # served from memory: the database was not read
        api_keys.announce_revocation(prod_stack.env["DOPSD_BROKER_URL"])  # the stack's shared Redis
        refused = client.get("/v1/jobs")
    engine.dispose()
    assert refused.status_code == 401, refused.text


def test_dopsd_keys_revoke_takes_effect_at_once_on_an_api_that_kept_the_key(prod_stack: Stack) -> None:
    key, bystander = prod_stack.create_key("revoked-at-once"), prod_stack.create_key("bystander")
    with prod_stack.client(key) as client, prod_stack.client(bystander) as other:
        assert client.get("/v1/jobs").status_code == 200 and other.get("/v1/jobs").status_code == 200  # both kept
        subprocess.run(
            [sys.executable, "-m", "dopsd", "keys", "revoke", key],
            env=prod_stack.env, cwd=REPO, check=True, capture_output=True,
        )  # fmt: skip
        assert client.get("/v1/jobs").status_code == 401  # the next request, however soon
        assert other.get("/v1/jobs").status_code == 200  # another key is read again, and still works
