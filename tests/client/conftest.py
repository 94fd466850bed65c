"""The client's tests run against the real production-shaped stack: PostgreSQL, Redis, SeaweedFS S3, the API under
uvicorn and a real Celery worker process, started with the same pieces as `tests/service/conftest.py`.

Pytest only sees a conftest's fixtures below its own folder, and re-exporting the session-scoped `prod_stack`
here would make a second instance of it (and of its database and SeaweedFS) live as long as the session, on the
same Redis database as the first: its worker would take the service tests' messages. So this folder has its own
stack, on its own database and Redis database, and stops it when the folder's tests are done.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
import redis

from scripts import stack
from tests.service.conftest import Stack, migrated_database


REDIS_DB = 11  # the service tests use 13 (the shared stack) and 12 (the database-restart test)


@pytest.fixture(scope="package")
def prod_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + one worker against a fresh PostgreSQL database, Redis db 11 and a SeaweedFS S3 server."""
    stack.ensure_postgres_and_redis()
    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    logs = tmp_path_factory.mktemp("client-stack")
    access, secret = "dopsd-client-test", secrets.token_urlsafe(16)
    seaweed, endpoint = stack.start_seaweedfs(logs / "s3", access_key=access, secret_key=secret, log=logs / "s3.log")
    databases = migrated_database("client")
    database = api = worker = None
    try:
        database = next(databases)
        port = stack.free_port()
        env = stack.stack_env(
            database_url=database, broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}", s3_endpoint=endpoint,
            access_key=access, secret_key=secret, public_url=f"http://127.0.0.1:{port}",
            bucket=f"dopsd-client-{os.getpid()}",
        )  # fmt: skip
        env.update(DOPSD_PROGRESS_INTERVAL_S="0.2", DOPSD_MAX_FILE_BYTES=str(2 * 1024 * 1024))
        api = stack.start_api(env, port, logs / "api.log")
        worker = stack.start_worker(env, logs / "worker.log", name="client-worker")
        yield Stack(f"http://127.0.0.1:{port}", env, database, logs, worker)
    finally:
        if worker is not None:
            stack.stop(worker, timeout_s=5)  # idle by now: no need to wait out Celery's warm shutdown
        if api is not None:
            stack.stop(api)
        stack.stop(seaweed, timeout_s=3)  # it ignores SIGTERM for 20 s; its data is a temporary folder
        if database is not None:
            next(databases, None)  # drops the database (the helper's code after its yield)
        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()


@pytest.fixture(scope="package")
def api_key(prod_stack: Stack) -> str:
    """A key made as an operator makes one (`dopsd keys create`)."""
    return prod_stack.create_key("client-tests")
