"""The in-process tier: `api.main.create_app()` under FastAPI's `TestClient`, on the embedded mode's backends
(SQLite, Celery's filesystem broker, the local artifact store), with no server process and no worker.

For what only the API decides (validation, auth, limits, the error shape, the OpenAPI document, dry runs), so
those cases cost milliseconds instead of a request to the production-shaped stack. Keys are made with the
operator's command (`dopsd keys create`), run in this process against the tier's database. With no worker,
a submitted job stays queued, which is what these tests want.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.commands import migrate
from api.main import create_app
from tests.api.local_api import LocalApi, tier_settings


@pytest.fixture(scope="session")
def broker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One broker folder for the tier: the producer side keeps one Celery app per broker URL and process, so
    every app of this process sends `filesystem://` messages to the folder the first one named."""
    return tmp_path_factory.mktemp("local-broker")


@pytest.fixture(scope="module")
def local_api(tmp_path_factory: pytest.TempPathFactory, broker_dir: Path) -> Iterator[LocalApi]:
    """The app on a fresh, migrated SQLite database and artifact folder, its lifespan running for the module."""
    settings = tier_settings(tmp_path_factory.mktemp("local-api"), broker_dir)
    migrate(settings.database_url)
    with TestClient(create_app(settings), base_url=settings.public_url) as started:
        yield LocalApi(settings, started)
