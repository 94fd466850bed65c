"""Revocation names one key exactly and stops what the key started; a restart does not bring a revoked
development key back. In process (tests/api/conftest.py), through the operator's command and HTTP."""

from __future__ import annotations

import json
import uuid

from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from api.main import create_app
from core import api_keys
from core.db import make_engine, make_sessionmaker, session_scope
from core.jobs.models import Job, WebhookDelivery
from tests.api.local_api import LocalApi
from tests.conftest import example_files, quick_spec


def _works(local_api: LocalApi, key: str) -> bool:
    with local_api.client(key) as client:
        return client.get("/v1/jobs").status_code == 200


def test_a_shared_name_is_refused_as_ambiguous_and_an_id_names_one_key(local_api: LocalApi) -> None:
    first, second = local_api.create_key("team"), local_api.create_key("team")
    out = local_api.command("keys", "revoke", "team", expect=1)
    assert "2 active keys are named 'team'" in out
    assert _works(local_api, first) and _works(local_api, second)  # neither was revoked

    first_id = local_api.key_ids()[first[:10]]
    assert f"revoked key {first_id}" in local_api.command("keys", "revoke", first_id)
    assert not _works(local_api, first) and _works(local_api, second)
    local_api.command("keys", "revoke", "team")  # now the name names one active key
    assert not _works(local_api, second)


def test_a_prefix_revokes_nothing_even_when_two_keys_share_it(local_api: LocalApi) -> None:
    sessions = make_sessionmaker(make_engine(local_api.settings.database_url))
    shared = "dopsd_" + uuid.uuid4().hex[:4]  # the 10 characters `keys list` shows: 24 random bits
    with session_scope(sessions) as session:
        _, mine = api_keys.create_api_key(session=session, name="mine", key=shared + uuid.uuid4().hex)
        _, theirs = api_keys.create_api_key(session=session, name="theirs", key=shared + uuid.uuid4().hex)
    assert "no key is" in local_api.command("keys", "revoke", shared, expect=1)
    assert _works(local_api, mine) and _works(local_api, theirs)
    local_api.command("keys", "revoke", mine)  # the key itself names it
    assert not _works(local_api, mine) and _works(local_api, theirs)


def test_revoking_a_key_cancels_its_queued_jobs_and_drops_their_webhooks(local_api: LocalApi) -> None:
    key, bystander = local_api.create_key("leaked"), local_api.create_key("bystander")
    spec = json.dumps({**quick_spec(), "webhook_url": "https://93.184.215.14/hook"})
    jobs: dict[str, str] = {}
    for name, k in (("leaked", key), ("bystander", bystander)):
        with local_api.client(k) as client:
            response = client.post("/v1/jobs", files=example_files(1), data={"spec": spec})
            assert response.status_code == 202, response.text
            jobs[name] = response.json()["id"]

    local_api.command("keys", "revoke", key)

    sessions = make_sessionmaker(make_engine(local_api.settings.database_url))
    with sessions() as session:
        status = {name: session.get_one(Job, uuid.UUID(i)).status for name, i in jobs.items()}
        deliveries = {
            name: {d.status for d in session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == uuid.UUID(i)))}
            for name, i in jobs.items()
        }  # fmt: skip
    assert status == {"leaked": "canceled", "bystander": "queued"}
    assert deliveries["leaked"] <= {"failed"}  # nothing more goes to a receiver the leaked key may have named
    with local_api.client(bystander) as client:  # the other key's job is untouched and still its own
        assert client.get(f"/v1/jobs/{jobs['bystander']}").json()["status"] == "queued"


def test_a_revoked_development_key_stays_revoked_across_restarts(local_api: LocalApi) -> None:
    dev_key = f"dopsd_dev_{uuid.uuid4().hex}"
    settings = local_api.settings.model_copy(update={"dev_api_key": SecretStr(dev_key)})
    with TestClient(create_app(settings), base_url=settings.public_url) as app:
        assert app.get("/v1/jobs", headers={"Authorization": f"Bearer {dev_key}"}).status_code == 200
    local_api.command("keys", "revoke", dev_key)
    with TestClient(create_app(settings), base_url=settings.public_url) as app:  # the service restarts
        assert app.get("/v1/jobs", headers={"Authorization": f"Bearer {dev_key}"}).status_code == 401
