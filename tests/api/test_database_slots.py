"""The API's database slots in process (tests/api/conftest.py): SQLite gets the configured pool, and as many session
slots as that pool has connections, like a server database; the slots are all given back once requests, probes and
scrapes end. (Concurrency against a one-connection pool is tested on the real stack: tests/service/test_api_pool.py.)"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi.testclient import TestClient

from api.commands import migrate
from api.main import create_app
from tests.api.local_api import KeyedClient, LocalApi, tier_settings


def gauge(metrics: str, name: str) -> float:
    """The value of an unlabelled gauge in a Prometheus text exposition."""
    found = re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE)
    assert found, f"no {name} in /metrics"
    return float(found.group(1))


def test_sqlite_gets_the_configured_pool_and_one_session_slot_per_connection(tmp_path: Path, broker_dir: Path) -> None:
    settings = tier_settings(tmp_path, broker_dir).model_copy(
        update={"database_pool_size": 2, "database_max_overflow": 1}
    )
    migrate(settings.database_url)
    with TestClient(create_app(settings), base_url=settings.public_url) as started:
        pool = started.app.state.database.engine.pool  # type: ignore[attr-defined]
        assert (type(pool).__name__, pool.size()) == ("QueuePool", 2)
        assert gauge(started.get("/metrics").text, "dopsd_database_session_slots") == 3  # 2 + 1, as configured

        key = LocalApi(settings, started).create_key("slots")
        with KeyedClient(started, {"Authorization": f"Bearer {key}"}) as client:

            def one(i: int) -> int:
                path = "/readyz" if i % 3 == 0 else "/v1/jobs" if i % 3 == 1 else "/v1/usage"
                return client.get(path).status_code

            with ThreadPoolExecutor(12) as pool_of_clients:
                statuses = set(pool_of_clients.map(one, range(48)))
        assert statuses == {200}
        metrics = started.get("/metrics").text
        assert gauge(metrics, "dopsd_database_sessions") == 0  # every session closed, its slot given back
        assert gauge(metrics, "dopsd_database_session_waiters") == 0
