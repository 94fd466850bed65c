"""The web page's end-to-end set-up: the production-shaped stack and headless Chromium driven by Playwright.

`prod_stack` here is the same shape as tests/service's (PostgreSQL, Redis, SeaweedFS S3, the API under uvicorn and
a real Celery worker), built from the same pieces but with its own database, Redis db and S3 server: pytest keeps
one instance of a session fixture per conftest, so sharing names would otherwise make two stacks fight over one
database when the whole suite runs.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts import stack
from tests.service.conftest import Stack, migrated_database


REDIS_DB = 10  # tests/service uses 13 and 12, tests/client 11
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def prod_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + one worker against PostgreSQL, Redis and SeaweedFS, for the web page's tests."""
    import redis

    stack.ensure_postgres_and_redis()
    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    folder = tmp_path_factory.mktemp("web-stack")
    access, secret = "dopsd-web", secrets.token_urlsafe(16)
    seaweed, endpoint = stack.start_seaweedfs(
        folder / "s3", access_key=access, secret_key=secret, log=folder / "s3.log"
    )
    database = migrated_database("web")
    processes = [seaweed]
    try:
        database_url = next(database)
        port = stack.free_port()
        env = stack.stack_env(
            database_url=database_url, broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}", s3_endpoint=endpoint,
            access_key=access, secret_key=secret, public_url=f"http://127.0.0.1:{port}",
            bucket=f"dopsd-web-{os.getpid()}",
        )  # fmt: skip
        env.update(DOPSD_PROGRESS_INTERVAL_S="0.2", DOPSD_MAX_FILE_BYTES=str(2 * 1024 * 1024))
        env.update(DOPSD_RATE_LIMIT_PER_MINUTE="1000", DOPSD_MAX_QUEUED_PER_KEY="10")
        processes.append(stack.start_api(env, port, folder / "api.log"))
        worker = stack.start_worker(env, folder / "worker.log", name="web-worker")
        processes.append(worker)
        yield Stack(f"http://127.0.0.1:{port}", env, database_url, folder, worker=worker)
    finally:
        for process in reversed(processes):
            stack.stop(process, timeout_s=3 if process is seaweed else 20)  # SeaweedFS lingers on SIGTERM
        next(database, None)


@pytest.fixture(scope="session")
def api_key(prod_stack: Stack) -> str:
    """A key made the way an operator makes one."""
    return prod_stack.create_key("web-page")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (never `playwright install`)."""
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); the web page's browser tests need it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install -e '.[dev]')")
    executable = str(CHROMIUM) if CHROMIUM.exists() else str(shutil.which("chromium"))
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()
