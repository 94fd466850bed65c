"""`/metrics` behind its token and its short cache, and the security headers of every kind of response, in
process (tests/api/conftest.py). The web page working under its policy is checked in the browser (tests/web)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.commands import migrate
from api.main import create_app
from tests.api.local_api import LocalApi, tier_settings
from tests.conftest import example_files, quick_spec
from tests.pace import eventually


TOKEN = "metrics-scraper-token"
QUEUED = re.compile(r'^dopsd_jobs\{kind="training",status="queued"\} (\S+)$', re.MULTILINE)


def start(home: Path, broker_dir: Path, **overrides: object) -> Iterator[LocalApi]:
    """The tier's app with some settings changed, its lifespan running while the generator is open."""
    settings = tier_settings(home, broker_dir).model_copy(update=overrides)
    migrate(settings.database_url)
    with TestClient(create_app(settings), base_url=settings.public_url) as started:
        yield LocalApi(settings, started)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, broker_dir: Path) -> Iterator[LocalApi]:
    """An app with a metrics token and an hour-long metrics cache."""
    yield from start(
        tmp_path_factory.mktemp("guarded"), broker_dir, metrics_token=SecretStr(TOKEN), metrics_cache_s=3600.0
    )


@pytest.fixture(scope="module")
def brief_cache(tmp_path_factory: pytest.TempPathFactory, broker_dir: Path) -> Iterator[LocalApi]:
    """An app whose metrics cache lasts a fraction of a second."""
    yield from start(tmp_path_factory.mktemp("brief"), broker_dir, metrics_cache_s=0.3)


def queued_jobs(api: LocalApi, token: str | None = None) -> float:
    """`dopsd_jobs{kind="training",status="queued"}` as a scrape reads it."""
    with api.client(token) as client:
        response = client.get("/metrics")
        assert response.status_code == 200, response.text
    found = QUEUED.search(response.text)
    assert found is not None, response.text
    return float(found.group(1))


def submit(api: LocalApi, key: str) -> None:
    """One job (it stays queued: the tier has no worker)."""
    with api.client(key) as client:
        response = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec())})
        assert response.status_code == 202, response.text


def test_metrics_answer_only_the_configured_token(guarded: LocalApi) -> None:
    for presented in (None, "wrong-token", guarded.create_key("not-a-scraper")):
        with guarded.client(presented) as client:
            refused = client.get("/metrics")
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "unauthorized"
    assert queued_jobs(guarded, TOKEN) >= 0


def test_metrics_reuse_their_job_aggregates_for_the_cache_time(guarded: LocalApi, brief_cache: LocalApi) -> None:
    before = queued_jobs(guarded, TOKEN)
    submit(guarded, guarded.create_key("cached"))
    assert queued_jobs(guarded, TOKEN) == before  # within the hour: the database is not read again

    before = queued_jobs(brief_cache)
    submit(brief_cache, brief_cache.create_key("fresh"))
    eventually(lambda: queued_jobs(brief_cache), lambda n: n == before + 1, "the new job in the metrics")


def test_every_response_carries_the_security_headers(local_api: LocalApi) -> None:
    key = local_api.create_key("headers")
    with local_api.client(key) as client:
        responses = {
            "page": client.get("/app/"),
            "script": client.get("/app/app.js"),
            "json": client.get("/v1/presets"),
            "error": client.get("/v1/jobs/00000000-0000-0000-0000-000000000000"),
            "unauthenticated": local_api.client(None).get("/v1/jobs"),
            "metrics": client.get("/metrics"),
            "docs": client.get("/docs"),
        }
    assert [r.status_code for r in responses.values()] == [200, 200, 200, 404, 401, 200, 200]
    for name, response in responses.items():
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff", name
        assert headers["referrer-policy"] == "no-referrer", name
        assert headers["x-frame-options"] == "DENY", name
        assert "frame-ancestors 'none'" in headers["content-security-policy"], name
    page = responses["page"].headers["content-security-policy"]
    assert "script-src 'self';" in page and "style-src 'self';" in page and "unsafe-inline" not in page
    assert "img-src 'self' data: blob:" in page  # thumbnails of the chosen files are blob: URLs
    assert responses["json"].headers["content-security-policy"].startswith("default-src 'none'")
